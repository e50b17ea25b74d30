"""Speech-out stage 2 (stage ``speech_decoder``): NAR pre-network + shared NAR/AR speech decoder
on (text -> frozen LLM input embeddings, codec tokens) pairs.

Manifest: ``{"text", "codec_tokens"}`` per line, e.g. the toy world's ``speech_out.jsonl`` after
``fo-jax prepare-codec``. Required overrides: ``stage.manifest=PATH`` and ``stage.llm_path=DIR`` (HF
Qwen2 directory with its tokenizer; only its embedding table is read). Without ``llm_path``,
``stage.tokenizer=DIR`` gives a random LLM table (tests, smoke runs).
Variants: ``tiny`` (CPU) and ``freeze_omni`` (the released decoder: 896 wide, 2 + 4 LLaMA blocks;
lr 5e-5 as in the paper, whose schedule is not published: the release's config says Noam with
4000 warm-up steps, weight decay 0.05, clipping 5).
"""

import ml_collections

from fo_jax.config import TOY_SAVE_EVERY, load_config, stage_variant


# The toy world's runs (``fo-jax toy`` / ``--quick``): the tiny model (the full run with
# ``freeze_omni.py:toy``'s LLM width and decoder), these many steps.
TOY_STEPS = {"toy": 1500, "toy_quick": 300}  # full: see speech_in_stage1.py


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    full_toy = variant == "toy"
    variant, toy_steps = stage_variant(variant, ("tiny", "freeze_omni"), TOY_STEPS)
    real = variant == "freeze_omni"
    model = load_config(f"configs/freeze_omni.py:{'toy' if full_toy else variant}").model.to_dict()
    steps = ml_collections.FieldReference(200_000 if real else 300)
    cfg = ml_collections.ConfigDict({
        "model": {"llm": model["llm"], "decoder": model["decoder"]},
        "stage": {
            "name": "speech_decoder",
            "manifest": "",
            "manifest_policy": "skip",
            "llm_path": "",
            "tokenizer": "",
            # The LLM embedding table stays frozen; the whole decoder (no prefix stack here) trains.
            "trainable": [r"^decoder/"],
            "steps": steps,
            "batch_size": 25 if real else 8,  # the release's max_batch_size
            "buckets": (250, 500, 1000) if real else (64, 128, 256),  # codec tokens (40 per second)
            "max_text_len": 256 if real else 48,  # text tokens after normalisation
            "input_noise": 0.0,  # share of teacher-forced codec inputs replaced by random codes
            "log_every": 10,
            "save_every": 2000 if real else 100,
            "keep": 3,
        },
        "optimizer": {"lr": 5e-5 if real else 2e-3, "schedule": "warmuplr" if real else "constant",
                      "warmup_steps": 4000 if real else 10, "total_steps": steps, "b1": 0.9, "b2": 0.98,
                      "eps": 1e-8, "weight_decay": 0.05, "clip_norm": 5.0, "lr_scales": ()},
        "mesh": {"shape": (-1, 1, 1)},
        "seed": 0,
    })
    if toy_steps:
        cfg.stage.update(steps=toy_steps, save_every=TOY_SAVE_EVERY)
        if not full_toy:
            # The quick world's decoder is as wide as its 64-wide LLM allows and twice as deep as
            # tiny: 150 steps reach codec-token CE 2.9 (tiny: 5.2). The full run's is
            # freeze_omni.py:toy's (128 x 2, its LLM's width; why: there).
            cfg.model.decoder.update(hidden_size=64, num_layers=4, intermediate_size=256)
        # Measured on the full world (stage 2 alone, greedy, 20 held-out answers recognised by
        # pocketsphinx, the 64 x 4 decoder): 600 steps of 8 speak neither train nor test sentences
        # (0 %); 2400 of 16 memorise the train ones (85 %) and fail the held-out (5 %); with half the
        # teacher-forced inputs replaced by random codes the held-out reach 70 % (0.3: 45 %; 1200
        # steps: 50 %). The 128 x 2 decoder learns faster per step (codec-token CE 3.6 against 4.4
        # at step 200): 1500 steps, for the full run's 30 minutes.
        cfg.stage.input_noise = 0.5
        if full_toy:
            cfg.stage.batch_size = 16
            cfg.optimizer.update(schedule="cosine", warmup_steps=50)
    return cfg
