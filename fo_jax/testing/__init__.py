"""Helpers for tests, benchmarks and toy experiments (offline speech synthesis, random tiny LLMs); not used by the library itself."""
