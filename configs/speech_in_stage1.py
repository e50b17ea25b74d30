"""Speech-in stage 1 (stage ``speech_in_ctc``): the speech encoder + CTC head on ASR pairs.

Manifest: ``{"audio": path, "text": transcript}`` per line (``fo-jax prepare`` writes one).
Variants: ``tiny`` (CPU tests, toy world) and ``freeze_omni`` (the released encoder: 1024 x 24,
lr 2e-4 as in the paper). Required override: ``stage.manifest=PATH``.
"""

import ml_collections

from fo_jax.config import load_config


# The toy world's runs (``fo-jax toy`` / ``--quick``): the tiny model, these many steps.
TOY_STEPS = {"toy": 1000, "toy_quick": 600}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in ("tiny", "freeze_omni", *TOY_STEPS):
        raise ValueError(f"unknown variant {variant!r}; expected tiny, toy, toy_quick or freeze_omni")
    toy_steps = TOY_STEPS.get(variant)
    variant = "tiny" if toy_steps else variant
    model = load_config(f"configs/freeze_omni.py:{variant}").model.to_dict()
    steps = ml_collections.FieldReference(20000 if variant == "freeze_omni" else 300)
    cfg = ml_collections.ConfigDict({
        "model": {"encoder": model["encoder"]},
        "stage": {
            "name": "speech_in_ctc",
            "manifest": "",
            "manifest_policy": "skip",
            # CMVN statistics stay frozen; the rest of the encoder and the CTC head train.
            "trainable": [r"^encoder/(?!cmvn_)", r"^ctc/"],
            "steps": steps,
            "batch_size": 64 if variant == "freeze_omni" else 8,
            "buckets": (512, 1024, 2000) if variant == "freeze_omni" else (256, 512),
            "max_label_len": 256 if variant == "freeze_omni" else 96,
            "spec_augment": {"num_freq_masks": 1, "max_freq_width": 10, "num_time_masks": 1, "max_time_width": 20},
            "cmvn_utterances": 1000 if variant == "freeze_omni" else 100,
            "log_every": 10,
            "save_every": 1000 if variant == "freeze_omni" else 100,
            "keep": 3,
        },
        "optimizer": {"lr": 2e-4 if variant == "freeze_omni" else 2e-3, "schedule": "warmuplr",
                      "warmup_steps": 25000 if variant == "freeze_omni" else 30, "total_steps": steps,
                      "b1": 0.9, "b2": 0.98, "eps": 1e-8, "weight_decay": 1e-6, "clip_norm": 5.0},
        "mesh": {"shape": (-1, 1, 1)},
        "seed": 0,
    })
    if toy_steps:
        cfg.stage.steps = toy_steps
    return cfg
