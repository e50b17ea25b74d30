"""Checkpoint conversion: HF Qwen2 safetensors and the official Freeze-Omni ``.pt`` files."""
