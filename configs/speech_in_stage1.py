"""Speech-in stage 1 (stage ``speech_in_ctc``): the speech encoder + CTC head on ASR pairs.

Manifest: ``{"audio": path, "text": transcript}`` per line (``fo-jax prepare`` writes one).
Variants: ``tiny`` (CPU tests, toy world), ``mid`` (a 256 x 6 encoder, about 5 M params: CPU
throughput benchmarks, small real runs) and ``freeze_omni`` (the released encoder: 1024 x 24,
lr 2e-4 as in the paper). Required override: ``stage.manifest=PATH``.
"""

import ml_collections

from fo_jax.config import TOY_SAVE_EVERY, load_config, stage_variant


# The toy world's runs (``fo-jax toy`` / ``--quick``): the tiny model (the full run with
# ``freeze_omni.py:toy``'s encoder), these many steps.
# The full run's counts keep it within its 30 minutes (BENCHMARKS.md: toy world run time).
# With 32-channel subsampling convs (freeze_omni.py:toy) a full-run step costs ~1/3 of the
# release-width one: 2000 / 1500 / 900 steps for speech-in 1 / 2 / 3 take less time than
# 900 / 1000 / 700 did (CTC WER 39 -> 33 %; more speech-in 3 steps overfit: 1400 steps, 28.8 -> 20.3 %).
TOY_STEPS = {"toy": 2000, "toy_quick": 600}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    toy_model = variant == "toy"  # the full toy world's encoder (configs/freeze_omni.py:toy)
    variant, toy_steps = stage_variant(variant, ("tiny", "mid", "freeze_omni"), TOY_STEPS)
    model_variant = "toy" if toy_model else "tiny" if variant == "mid" else variant
    model = load_config(f"configs/freeze_omni.py:{model_variant}").model.to_dict()
    if variant == "mid":
        model["encoder"].update(hidden_size=256, num_layers=6, num_heads=4, ffn_size=1024)
    steps = ml_collections.FieldReference({"tiny": 300, "mid": 5000, "freeze_omni": 20000}[variant])
    cfg = ml_collections.ConfigDict({
        "model": {"encoder": model["encoder"]},
        "stage": {
            "name": "speech_in_ctc",
            "manifest": "",
            "manifest_policy": "skip",
            # CMVN statistics stay frozen; the rest of the encoder and the CTC head train.
            "trainable": [r"^encoder/(?!cmvn_)", r"^ctc/"],
            "steps": steps,
            "batch_size": {"tiny": 8, "mid": 16, "freeze_omni": 64}[variant],
            "buckets": (256, 512) if variant == "tiny" else (512, 1024, 2000),
            "max_label_len": 96 if variant == "tiny" else 256,
            "ctc_units": 0,  # 0: characters; N: N word pieces learned from the transcripts (fo_jax.text.ctc_vocab)
            "spec_augment": {"num_freq_masks": 1, "max_freq_width": 10, "num_time_masks": 1, "max_time_width": 20},
            "cmvn_utterances": 1000 if variant == "freeze_omni" else 100,
            "log_every": 10,
            "save_every": 100 if variant == "tiny" else 1000,
            "keep": 3,
        },
        "optimizer": {"lr": {"tiny": 2e-3, "mid": 1e-3, "freeze_omni": 2e-4}[variant], "schedule": "warmuplr",
                      "warmup_steps": {"tiny": 30, "mid": 500, "freeze_omni": 25000}[variant], "total_steps": steps,
                      "b1": 0.9, "b2": 0.98, "eps": 1e-8, "weight_decay": 1e-6, "clip_norm": 5.0, "lr_scales": ()},
        "mesh": {"shape": (-1, 1, 1)},
        "seed": 0,
    })
    if toy_steps:
        cfg.stage.update(steps=toy_steps, save_every=TOY_SAVE_EVERY)
        # Measured on the toy world (issue 7 notes): a few epochs of clean synthetic speech learn
        # faster with cosine decay and without SpecAugment (400 steps: WER 80 % -> 70 %).
        cfg.optimizer.update(schedule="cosine", warmup_steps=50)
        cfg.stage.spec_augment = {}
    if toy_model:
        # Word pieces instead of characters (full toy world, all else equal): CTC sentences exact
        # 35.1 -> 44.6 % (WER 32.6 % both: the errors gather on the entity words, each heard in 4
        # clips), 10 -> 2 utterances too short for their labels; speech in -> text 30.5 % (spread
        # 28.8-33.9). The measured full run (BENCHMARKS.md, toy world): 43.2 %, WER 31.6 %. --quick keeps
        # characters: its tiny encoder read WER 60.4 % on 256 pieces (43-51 % on characters).
        cfg.stage.ctc_units = 256
    return cfg
