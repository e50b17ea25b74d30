"""Speech-out stage 1 (stage ``codec``): TiCodec GAN training on 24 kHz speech.

Manifest: ``{"audio": path}`` per line (the toy world's ``speech_out.jsonl``; other fields ignored).
Variants: ``tiny`` (CPU tests and toy runs: the tiny codec, discriminators 8x narrower, 0.2 s crops)
and ``freeze_omni`` (the released codec and HiFi-GAN discriminators; TiCodec's recipe: AdamW lr 2e-4,
betas 0.5/0.9, lr x0.98 per epoch, 1 s crops, no clipping). Required override: ``stage.manifest=PATH``.
``stage.init_from`` = the release's codec directory fine-tunes it instead of training from scratch.
"""

import ml_collections

from fo_jax.config import load_config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in ("tiny", "freeze_omni"):
        raise ValueError(f"unknown variant {variant!r}; expected tiny or freeze_omni")
    real = variant == "freeze_omni"
    codec = load_config(f"configs/freeze_omni.py:{variant}").model.codec.to_dict()
    codec["segment_size"] = 24000 if real else 4800  # training crop, samples; a multiple of 600 (one token)
    return ml_collections.ConfigDict({
        "model": {"codec": codec},
        "stage": {
            "name": "codec",
            "manifest": "",
            "manifest_policy": "skip",
            "init_from": "",
            # Everything trains, running statistics included (they are updated, not optimised).
            "trainable": [r"^codec/", r"^codec_batch_stats/", r"^mpd/", r"^msd/", r"^msd_batch_stats/"],
            "steps": 400_000 if real else 300,
            "batch_size": 160 if real else 4,  # global; released: 160 over 8 GPUs
            "disc_periods": (2, 3, 5, 7, 11),  # the multi-period discriminator's periods
            "disc_width_divisor": 1 if real else 8,  # hidden widths / this (1: HiFi-GAN size)
            "peak_level": 0.95,  # HiFi-GAN's loader normalises each utterance's peak; 0 disables
            "loss_weights": {},  # overrides of fo_jax.training.codec_losses.GENERATOR_WEIGHTS
            "log_every": 10,
            "save_every": 5000 if real else 100,
            "keep": 3,
        },
        # Two optimizers (generator, discriminators) with these settings; decay_steps 0 = one epoch.
        "optimizer": {"lr": 2e-4 if real else 1e-3, "schedule": "exponential", "decay_rate": 0.98,
                      "decay_steps": 0, "warmup_steps": 0, "b1": 0.5, "b2": 0.9, "eps": 1e-8,
                      "weight_decay": 0.01, "clip_norm": 0.0, "lr_scales": ()},
        "mesh": {"shape": (-1, 1, 1)},
        "seed": 0,
    })
