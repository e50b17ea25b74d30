"""Helpers for tests and toy experiments (offline speech synthesis); not used by the library itself."""
