"""The whole listening step per 160 ms chunk: fbank -> encoder -> adapter -> LLM chunk -> state head.

What it does:

1. Builds random params of the ``qwen2_0_5b`` variant of ``configs/freeze_omni.py``: the released
   speech encoder (1024 x 24, 16 heads, 4-frame chunks, 16 left chunks) and adapter (subsampling,
   -> 896) around a Qwen2-0.5B-shaped LLM (24 layers, hidden 896, 14 / 2 heads, vocab 151936).
   Every part runs in the benchmarked dtype (float32, then bfloat16 for params and compute).
2. Prefills the system role, opens one session (batch 1, KV cache of ``--max-len`` slots) and
   streams random fbank chunks through ``fo_jax.inference.session.listen`` (jitted, session
   donated, state decision off so it keeps listening). The first chunk of a turn (user header +
   prompts + audio, 32 LLM positions) and the steady chunks (2 LLM positions) are timed apart,
   ``block_until_ready`` after every call as in streaming. Compile time is excluded (warm-up).
3. For the breakdown it also times the speech part alone (encoder + adapter streaming step).
   With ``--batch N`` > 1 it also times N users stepping together (ms per call, all N chunks).

Reported: median ms per chunk (and mean), the real-time factor (ms / 160), and the machine load
(``os.getloadavg``) before and after each dtype. Targets (issue 3): <= 160 ms f32, <= 70 ms bf16.

Usage:
  .venv/bin/python benchmarks/listen_step.py [--quick] [--json OUT] [--chunks 40] [--max-len 2048]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fo_jax.config import load_config, model_config  # noqa: E402
from fo_jax.inference import session as S  # noqa: E402
from fo_jax.models import audio_llm  # noqa: E402
from fo_jax.models.adapter import SpeechInputState, speech_input_step_jit  # noqa: E402
from fo_jax.models.configs import ModelConfig  # noqa: E402
from fo_jax.runtime import enable_compilation_cache  # noqa: E402

CHUNK_MS = 160.0
# Qwen2 ids of the released template (ChatTemplate.from_tokenizer(qwen2_tokenizer()) gives these).
TEMPLATE = audio_llm.ChatTemplate(system_ids=(151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13),
                                  listen_ids=(151645, 198, 151644, 872, 198),
                                  speak_ids=(151645, 198, 151644, 77091, 198), end_id=151645)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def with_dtype(cfg: ModelConfig, dtype: str) -> ModelConfig:
    kw = dict(dtype=dtype, param_dtype=dtype)
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **kw),
                               encoder=dataclasses.replace(cfg.encoder, **kw),
                               adapter=dataclasses.replace(cfg.adapter, **kw))


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append((time.perf_counter() - t) * 1e3)
    return out


def summary(ms: list[float]) -> dict:
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "n": len(ms),
            "rtf": statistics.median(ms) / CHUNK_MS}


def run_dtype(base: ModelConfig, dtype: str, args) -> dict:
    cfg = with_dtype(base, dtype)
    res = {"dtype": dtype, "load_before": os.getloadavg()}
    t = time.perf_counter()
    params = jax.jit(lambda k: nn.unbox(audio_llm.init_params(cfg, k)))(jax.random.key(0))
    jax.block_until_ready(params)
    res["init_s"] = time.perf_counter() - t
    res["params_m"] = sum(x.size for x in jax.tree.leaves(params)) / 1e6
    rng = np.random.default_rng(0)
    chunks = [jnp.asarray(rng.normal(size=(1, 16, 80)) * 3 + 8, jnp.float32) for _ in range(4)]
    system = S.prefill_system(params, TEMPLATE, cfg)

    def new(batch):
        return S.new_session(system, cfg=cfg, batch=batch, max_len=args.max_len)

    def step(sess, chunk):
        b = sess.batch
        return S.listen(params, sess, chunk, jnp.ones((b,), bool), jnp.zeros((b,), bool), cfg=cfg,
                        template=TEMPLATE)

    # Warm-up (compile), then first chunks of turns (each on a fresh session) and steady chunks.
    t = time.perf_counter()
    sess, _ = step(new(1), chunks[0])
    jax.block_until_ready(sess)
    res["compile_s"] = time.perf_counter() - t
    first = []
    for i in range(args.first):
        fresh = new(1)
        jax.block_until_ready(fresh)
        tt = time.perf_counter()
        fresh, probs = step(fresh, chunks[i % 4])
        jax.block_until_ready(probs)
        first.append((time.perf_counter() - tt) * 1e3)
    res["first_chunk"] = summary(first)
    holder = {"s": sess, "i": 0}

    def steady():
        holder["i"] += 1
        holder["s"], probs = step(holder["s"], chunks[holder["i"] % 4])
        return probs

    timed(steady, 2)
    res["steady_chunk"] = summary(timed(steady, args.chunks))
    res["context_after"] = int(holder["s"].cache.lengths[0])

    # Speech part alone (encoder + adapter streaming step).
    vars_ad = audio_llm.adapter_variables(params)
    sp = {"s": SpeechInputState.zeros(cfg.encoder, cfg.adapter, 1)}
    frames = jnp.concatenate([jnp.zeros((1, 3, 80)), chunks[0]], axis=1)

    def speech():
        sp["s"], emb = speech_input_step_jit(params["encoder"], vars_ad, cfg.encoder, cfg.adapter, sp["s"], frames)
        return emb

    timed(speech, 3)
    res["speech_only"] = summary(timed(speech, args.chunks))

    if args.batch > 1:
        bs = {"s": new(args.batch)}
        bchunk = jnp.concatenate([chunks[0]] * args.batch)
        bs["s"], _ = step(bs["s"], bchunk)

        def batched():
            bs["s"], probs = step(bs["s"], bchunk)
            return probs

        timed(batched, 2)
        res[f"batch{args.batch}_steady_call"] = summary(timed(batched, max(args.chunks // 2, 5)))
    res["load_after"] = os.getloadavg()
    del params, system
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few chunks, float32 + bfloat16")
    ap.add_argument("--chunks", type=int, default=40, help="steady chunks timed")
    ap.add_argument("--first", type=int, default=5, help="turn-opening chunks timed")
    ap.add_argument("--max-len", type=int, default=2048, help="LLM KV-cache slots per session")
    ap.add_argument("--batch", type=int, default=1, help="also time this many users stepping together")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.chunks, args.first = 10, 2
    enable_compilation_cache()
    base = model_config(load_config("configs/freeze_omni.py:qwen2_0_5b"))
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "jax": jax.__version__, "backend": jax.default_backend()},
               "max_len": args.max_len, "runs": []}
    for dtype in args.dtypes.split(","):
        log(f"[{dtype}] building and compiling ...")
        r = run_dtype(base, dtype, args)
        results["runs"].append(r)
        log(f"[{dtype}] steady chunk {r['steady_chunk']['median_ms']:.1f} ms (RTF {r['steady_chunk']['rtf']:.2f}), "
            f"first chunk {r['first_chunk']['median_ms']:.1f} ms, speech part {r['speech_only']['median_ms']:.1f} ms, "
            f"compile {r['compile_s']:.0f} s, load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}")
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
