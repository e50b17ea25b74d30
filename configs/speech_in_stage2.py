"""Speech-in stage 2 (stage ``speech_in_llm``): encoder + adapter + task embeddings into the frozen
LLM, transcript as the LLM's target.

Variants: ``tiny`` (CPU tests, toy world) and ``freeze_omni`` (the released encoder and adapter
around Qwen2-7B-Instruct; lr 1e-4 as in the paper; LLM and encoder blocks rematerialised, the
encoder computing in bfloat16 on float32 master weights).
Required overrides: ``stage.manifest=PATH`` (speech-in 1's ``{"audio", "text"}`` manifest) and
``stage.llm_path=DIR`` (a HF Qwen2 directory with its tokenizer; tests pass ``stage.tokenizer=DIR``
instead and get a random LLM). Usually ``stage.encoder_from=WORKDIR`` (a stage-1 run).
``--compile-only`` needs none of them.
"""

import ml_collections

from fo_jax.config import TOY_SAVE_EVERY, load_config, stage_variant
from fo_jax.toy.world import TRANSCRIBE_PREFIX


# The toy world's runs (``fo-jax toy`` / ``--quick``): the tiny model (the full run with
# ``freeze_omni.py:toy``'s encoder), these many steps.
TOY_STEPS = {"toy": 1500, "toy_quick": 800}  # full: see speech_in_stage1.py


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    toy_model = variant == "toy"  # the full toy world's encoder (configs/freeze_omni.py:toy)
    variant, toy_steps = stage_variant(variant, ("tiny", "freeze_omni"), TOY_STEPS)
    model = load_config(f"configs/freeze_omni.py:{'toy' if toy_model else variant}").model.to_dict()
    big = variant == "freeze_omni"
    # At scale: LLM blocks scanned over stacked params and rematerialised, encoder blocks
    # rematerialised (BENCHMARKS.md, speech-in 2 memory); tiny keeps the inference layout.
    model["llm"].update(remat=big, scan_layers=big)
    model["encoder"]["remat"] = big
    if big:
        model["encoder"]["dtype"] = model["adapter"]["dtype"] = "bfloat16"
    steps = ml_collections.FieldReference(40000 if big else 300)
    cfg = ml_collections.ConfigDict({
        "model": {"llm": model["llm"], "encoder": model["encoder"], "adapter": model["adapter"]},
        "stage": {
            "name": "speech_in_llm",
            "manifest": "",
            "manifest_policy": "skip",
            "llm_path": "",
            "tokenizer": "",
            "encoder_from": "",
            # The user turn: this text, then the speech (the toy LLM learned "Transcribe: <s>" -> "<s>").
            "instruction": TRANSCRIBE_PREFIX,
            "system_role": "",  # "" keeps the template's system line
            "audio_bos_eos": True,
            # CMVN statistics stay frozen; the LLM, prompt embeddings and state head too (stage 3's).
            "trainable": [r"^encoder/(?!cmvn_)", r"^adapter/", r"^task_embeddings/"],
            "steps": steps,
            "batch_size": 32 if big else 8,
            "buckets": (512, 1024, 2000) if big else (256, 512),  # fbank frames, whole 16-frame chunks
            "max_label_len": 128 if big else 48,  # transcript tokens + <|im_end|>
            "template_len": 64,  # budget for the chat template's text around the speech
            "spec_augment": {"num_freq_masks": 1, "max_freq_width": 10, "num_time_masks": 1, "max_time_width": 20},
            "cmvn_utterances": 1000 if big else 100,
            "log_every": 10,
            "save_every": 1000 if big else 100,
            "keep": 3,
        },
        "optimizer": {"lr": 1e-4 if big else 2e-3, "schedule": "warmuplr",
                      "warmup_steps": 2000 if big else 30, "total_steps": steps,
                      "b1": 0.9, "b2": 0.98, "eps": 1e-8, "weight_decay": 1e-6, "clip_norm": 5.0, "lr_scales": ()},
        "mesh": {"shape": (-1, 1, 1)},
        "seed": 0,
    })
    if toy_steps:
        cfg.stage.update(steps=toy_steps, save_every=TOY_SAVE_EVERY)
        # As speech-in 1 (there: why). lr 1e-3 instead of 2e-3 (full world, same stage 1): transcript
        # WER 39.3 -> 33.8 %, but speech in -> text out unchanged (28.8 %), state head 87.2 -> 83.7 %.
        cfg.optimizer.update(schedule="cosine")
        cfg.stage.spec_augment = {}
        cfg.model.adapter.prompt_num = 25  # stage 3's (it checks the model matches this run's)
    return cfg
