"""fo_jax: Freeze-Omni (arXiv 2411.00774) in JAX/Flax.

Layout (lowest layer first; nothing imports a layer above its own):
  layers/      attention, RoPE, norms, MLPs, KV caches
  models/      Qwen2 LLM, speech encoder/adapter, speech decoder, codec; their config dataclasses
  conversion/  HF Qwen2 safetensors and official Freeze-Omni checkpoints -> our params
  inference/   samplers and jitted streaming step functions
  training/    losses, optimizers and train steps
  data/        input pipelines
  cli/ serving/  the ``fo-jax`` command and the multi-user server
"""

__version__ = "0.1.0"
