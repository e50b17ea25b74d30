"""Building blocks shared by the models: norms, rotary embeddings, attention, MLPs, KV caches."""
