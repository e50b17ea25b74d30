"""The ``fo-jax`` command line."""
