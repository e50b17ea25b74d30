"""Serving: the multi-user "model as a server" engine that batches users' session pytrees."""
