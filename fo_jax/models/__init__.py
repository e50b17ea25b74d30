"""Freeze-Omni models: the frozen Qwen2 LLM, speech encoder/adapter, speech decoder, codec."""
