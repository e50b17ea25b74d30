"""Inference: samplers, jitted prefill/decode steps, streaming pipelines."""
