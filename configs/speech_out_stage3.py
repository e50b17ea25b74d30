"""Speech-out stage 3 (stage ``speech_prefix``): the NAR prefix stack alone, on the frozen LLM's
hidden states of its answers; everything else frozen.

Manifest: ``{"question", "text" (the answer), "codec_tokens"}`` per line, e.g. the toy world's
``speech_out_answers.jsonl`` after ``fo-jax prepare-codec``. Required overrides:
``stage.manifest=PATH``, ``stage.decoder_from=DIR`` (a ``speech_decoder`` run) and
``stage.llm_path=DIR`` (the same HF Qwen2 directory as that run; checked). Variants as stage 2
(lr 5e-5 as in the paper).
"""

import ml_collections

from fo_jax.config import load_config


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    cfg = load_config(f"configs/speech_out_stage2.py:{variant}")
    cfg.unlock()
    real = variant == "freeze_omni"
    cfg.stage.update(name="speech_prefix", trainable=[r"^decoder/layers_prefix_"], decoder_from="",
                     system_prompt="",  # "" = the chat template's default system line
                     max_dialogue_len=512 if real else 96,  # system + question + header + answer tokens
                     max_answer_len=256 if real else 48)
    cfg.stage.steps = 50_000 if real else {"toy": 400, "toy_quick": 100}.get(variant, 300)
    return cfg
