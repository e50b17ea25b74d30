"""Training-step throughput of the speech-output stages (``codec``, ``speech_decoder``,
``speech_prefix``) at their ``tiny`` presets, CPU.

What it does, in a temporary directory:

1. ``codec``: builds the stage on ``--speech_out`` (e.g. the toy world's ``speech_out.jsonl``),
   trains ``--codec_steps`` steps through ``fo_jax.training.trainer`` (a run stage 2 can take its
   tokens from), then times the GAN step alone.
2. Writes codec tokens for ``--speech_out`` and ``--answers`` with that run (``prepare_codec_tokens``).
3. ``speech_decoder`` on the speech-out tokens, then ``speech_prefix`` on the answers (decoder from a
   short stage-2 run). The LLM is a random tiny Qwen2 with a BPE tokenizer trained on the texts.

Timing: per stage, two warm-up steps (the first's time, mostly compilation, reported apart), then
``--steps`` steps of the loop the trainer runs (next batch from the grain iterator, device put, jitted step,
``block_until_ready`` on the metrics); steps/s = steps / wall time, with process CPU time, the
machine load (os.getloadavg) and a matmul GFLOP/s probe, as the machine is shared.

Usage:
  .venv/bin/python benchmarks/training_stages.py --speech_out M.jsonl --answers A.jsonl [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec import matmul_gflops  # noqa: E402

from fo_jax import sharding  # noqa: E402
from fo_jax.config import load_config  # noqa: E402
from fo_jax.data.manifest import read_manifest  # noqa: E402
from fo_jax.runtime import enable_compilation_cache  # noqa: E402
from fo_jax.testing.llm import write_random_llm_dir  # noqa: E402
from fo_jax.text.tokenizer import chatml  # noqa: E402
from fo_jax.training import distributed, trainer  # noqa: E402
from fo_jax.training.freeze import split_trainable  # noqa: E402
from fo_jax.training.optim import OptimizerConfig  # noqa: E402
from fo_jax.training.stages import build_stage  # noqa: E402


def time_stage(cfg, steps: int) -> dict:
    """Compile seconds and steady steps/s of one stage's training loop (no checkpointing)."""
    stage = build_stage(cfg)
    mesh = sharding.make_mesh((-1, 1, 1))
    shardings = sharding.param_shardings(jax.eval_shape(stage.init_boxed, jax.random.key(cfg.seed)), mesh)
    params = jax.device_put(stage.load_params(jax.random.key(cfg.seed)), shardings)  # placed as the trainer does
    trainable, frozen = split_trainable(params, stage.trainable)
    update = trainer.stage_step(stage, OptimizerConfig.from_dict(cfg.optimizer.to_dict()))
    opt_state = jax.jit(update.init)(trainable)
    batches = iter(stage.dataset(cfg.seed))
    rng = jax.random.key(0)

    def one():
        nonlocal trainable, opt_state
        trainable, opt_state, metrics = update.step(trainable, opt_state, frozen,
                                                    distributed.global_batch(next(batches), mesh), rng)
        return jax.block_until_ready(metrics)

    t = time.perf_counter()
    one()
    compile_s = time.perf_counter() - t
    one()  # the step's outputs are its next inputs: make sure nothing recompiles in the timed loop
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        metrics = one()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    example = next(batches)
    return {"compile_s": round(compile_s, 1), "steps_per_s": round(steps / wall, 3),
            "cpu_s_per_step": round(cpu / steps, 3), "loss": float(metrics["loss"]),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "batch": {k: list(v.shape) for k, v in example.items()}}


def report(results: dict, json_path: str | None) -> None:
    """Adds the machine's state after the run to ``results``; prints them (and writes ``json_path``)."""
    results["load_after"] = os.getloadavg()
    results["matmul_gflops_after"] = round(matmul_gflops(), 1)
    print(json.dumps(results, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speech_out", required=True, help="manifest of 24 kHz speech with 'text'")
    ap.add_argument("--answers", required=True, help="manifest with 'question' and 'text' (answer) and audio")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--codec_steps", type=int, default=2, help="codec training before its tokens are used")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    enable_compilation_cache()
    from fo_jax.data.codec_tokens import prepare_codec_tokens
    from fo_jax.training.stages.codec import load_speech_codec

    results = {"load_before": os.getloadavg(), "matmul_gflops_before": round(matmul_gflops(), 1)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        codec_cfg = load_config("configs/speech_out_stage1.py:tiny", [
            f"stage.manifest={args.speech_out}", f"stage.steps={args.codec_steps}"])
        trainer.train(codec_cfg, tmp / "codec", progress=False)
        results["codec"] = time_stage(codec_cfg, args.steps)
        codec = load_speech_codec(tmp / "codec")
        prepare_codec_tokens(args.speech_out, tmp / "speech_out.jsonl", codec, progress=False)
        prepare_codec_tokens(args.answers, tmp / "answers.jsonl", codec, progress=False)
        texts = [chatml([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["text"]}])
                 for r in read_manifest(args.answers, required=["question", "text"])]
        texts += [r["text"] for r in read_manifest(args.speech_out, required=["text"])]
        llm = write_random_llm_dir(tmp / "llm", texts)
        common = [f"stage.llm_path={llm}", "stage.log_every=1", "stage.buckets=(128,)"]  # one shape: no recompiles
        decoder_cfg = load_config("configs/speech_out_stage2.py:tiny", common + [
            f"stage.manifest={tmp / 'speech_out.jsonl'}", "stage.steps=1"])
        results["speech_decoder"] = time_stage(decoder_cfg, args.steps)
        trainer.train(decoder_cfg, tmp / "decoder", progress=False)
        prefix_cfg = load_config("configs/speech_out_stage3.py:tiny", common + [
            f"stage.manifest={tmp / 'answers.jsonl'}", f"stage.decoder_from={tmp / 'decoder'}"])
        results["speech_prefix"] = time_stage(prefix_cfg, args.steps)
    report(results, args.json)


if __name__ == "__main__":
    main()
