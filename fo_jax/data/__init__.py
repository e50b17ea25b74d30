"""Data: grain pipelines over JSONL manifests / TFDS sources, fbank features, SpecAugment, bucketing."""
