"""Text side: tokenizers and the ChatML template."""
