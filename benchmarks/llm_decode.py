"""LLM decode speed: our jitted ``decode_step`` vs transformers (PyTorch), same weights, one process.

What it does (see BENCHMARKS.md for results and notes):

1. Builds a random Qwen2-0.5B-shaped ``Qwen2ForCausalLM`` in PyTorch (24 layers, hidden 896,
   MLP 4864, 14 heads / 2 KV heads, head_dim 64, vocab 151936, tied embeddings, rope theta 1e6),
   ``save_pretrained``s it to a temp dir and loads that into our JAX model with
   ``fo_jax.conversion.hf_qwen2.load_hf_qwen2`` -- both sides run the very same weights.
2. For float32 and bfloat16: prefills the same random 300-token prompt on both sides, then times
   greedy decoding one token at a time at that context (batch 1):
     * ours:  ``fo_jax.inference.llm.decode_step`` (jitted, cache donated) + a jitted argmax,
              ``block_until_ready`` every step (the next input depends on it, as in streaming);
     * torch: ``model(input_ids=tok, past_key_values=cache, use_cache=True)`` + argmax, eager,
              under ``torch.inference_mode()``, ``torch.set_num_threads(2)``, DynamicCache.
   Both compute full-vocabulary logits for one position per step, run a few warm-up steps first
   (ours: compile excluded), and are timed per step with ``time.perf_counter``; we report the
   median (and the best step; the JSON also has the mean). The two sides decode alternately in
   rounds so that machine noise hits both.
3. Measures the machine's read bandwidth (best of numpy / jitted jnp.sum / torch sum over a
   >= 1 GiB array, and a jitted sum over the model's own weights) and the bandwidth floor
   = bytes read per decode token (all weights -- the tied embedding is read whole by the LM head --
   plus the valid KV cache) / bandwidth.

Usage:
  .venv/bin/python benchmarks/llm_decode.py [--quick] [--json OUT] [--context 300] [--tokens 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fo_jax.conversion.hf_qwen2 import load_hf_qwen2  # noqa: E402
from fo_jax.inference import llm  # noqa: E402

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                 rope_theta=1_000_000.0, max_position_embeddings=32768, rms_norm_eps=1e-6)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_bandwidth(gib: float, repeats: int, torch) -> dict:
    """Read bandwidth (GB/s) of summing a ``gib`` GiB float32 array with numpy, XLA and torch."""
    a = np.ones(int(gib * (1 << 30)) // 4, np.float32)
    out = {"array_gib": gib}
    a.sum()
    out["numpy_sum"] = a.nbytes / _best(lambda: a.sum(), repeats) / 1e9
    ja = jnp.asarray(a)
    jsum = jax.jit(jnp.sum)
    jsum(ja).block_until_ready()
    out["jax_sum"] = a.nbytes / _best(lambda: jsum(ja).block_until_ready(), repeats) / 1e9
    del ja
    ta = torch.from_numpy(a)
    ta.sum()
    out["torch_sum"] = a.nbytes / _best(lambda: ta.sum(), repeats) / 1e9
    del ta, a
    gc.collect()
    return out


def measure_weight_sweep(params, repeats: int) -> float:
    """Seconds for one jitted pass that reads every weight once (sum of all leaves, f32 accumulate)."""
    leaves = jax.tree.leaves(params)
    f = jax.jit(lambda ls: sum(jnp.sum(x, dtype=jnp.float32) for x in ls))
    f(leaves).block_until_ready()
    return _best(lambda: f(leaves).block_until_ready(), repeats)


def build_checkpoint(directory: str, torch, transformers) -> float:
    t = time.perf_counter()
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**QWEN2_05B)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(directory, safe_serialization=True)
    del model
    gc.collect()
    return time.perf_counter() - t


class TorchDecoder:
    """Eager transformers decode: model(tok, past_key_values=cache) + argmax, one token per call."""

    def __init__(self, directory, dtype, torch, transformers):
        self.torch = torch
        self.model = transformers.Qwen2ForCausalLM.from_pretrained(
            directory, dtype=dtype).eval()
        self.cache = None
        self.token = None

    def prefill(self, prompt: np.ndarray):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(prompt[None].astype(np.int64)), use_cache=True,
                             logits_to_keep=1)
        self.cache = out.past_key_values
        self.token = out.logits[:, -1].argmax(-1, keepdim=True)
        return out.logits[0, -1].float().numpy()

    def step(self):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True)
            self.cache = out.past_key_values
            self.token = out.logits[:, -1].argmax(-1, keepdim=True)
        return out.logits

    def context(self) -> int:
        return int(self.cache.get_seq_length())


@jax.jit
def _argmax(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class JaxDecoder:
    """Our decode: jitted ``llm.decode_step`` (cache donated) + jitted argmax, synced every step."""

    def __init__(self, cfg, params, max_len):
        self.cfg = cfg
        self.params = params
        self.max_len = max_len
        self.cache = None
        self.token = None

    def prefill(self, prompt: np.ndarray):
        t = llm.round_up(len(prompt), llm.PROMPT_BUCKET)
        tokens = np.zeros((1, t), np.int32)
        tokens[0, : len(prompt)] = prompt
        cache = llm.init_cache(self.cfg, 1, self.max_len)
        logits, _, self.cache = llm.prefill(self.params, jnp.asarray(tokens),
                                            jnp.asarray([len(prompt)], jnp.int32), cache, cfg=self.cfg)
        self.token = _argmax(logits)
        return np.asarray(logits[0])

    def step(self):
        logits, _, self.cache = llm.decode_step(self.params, self.token, self.cache, cfg=self.cfg)
        self.token = _argmax(logits)
        self.token.block_until_ready()
        return logits

    def context(self) -> int:
        return int(self.cache.lengths[0])


def time_steps(decoder, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        decoder.step()
        times.append(time.perf_counter() - t)
    return times


def run_dtype(dtype_name: str, directory: str, prompt: np.ndarray, args, torch, transformers) -> dict:
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    res = {"dtype": dtype_name}

    t = time.perf_counter()
    cfg, np_params = load_hf_qwen2(directory, dtype=dtype_name)
    params = jax.device_put(np_params)
    jax.block_until_ready(params)
    del np_params
    res["jax_load_s"] = time.perf_counter() - t
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    t = time.perf_counter()
    tdec = TorchDecoder(directory, torch_dtype, torch, transformers)
    res["torch_load_s"] = time.perf_counter() - t

    total_new = args.warmup + args.tokens + 1
    max_len = llm.round_up(llm.round_up(len(prompt), llm.PROMPT_BUCKET) + total_new, llm.CACHE_BUCKET)
    jdec = JaxDecoder(cfg, params, max_len)

    t = time.perf_counter()
    ref_logits = tdec.prefill(prompt)
    res["torch_prefill_s"] = time.perf_counter() - t
    t = time.perf_counter()
    our_logits = jdec.prefill(prompt)
    res["jax_prefill_incl_compile_s"] = time.perf_counter() - t
    res["prefill_logits_max_abs_diff"] = float(np.abs(ref_logits - our_logits).max())

    # Warm-up (ours: the first call compiles decode_step).
    t = time.perf_counter()
    jdec.step()
    res["jax_decode_compile_s"] = time.perf_counter() - t
    tdec.step()
    for _ in range(args.warmup - 1):
        jdec.step()
        tdec.step()

    # Same tokens so far? (greedy on both sides from the same prompt)
    res["same_greedy_tokens_after_warmup"] = bool(int(jdec.token[0]) == int(tdec.token[0, 0]))

    ours, theirs = [], []
    per_round = max(1, args.tokens // args.rounds)
    done = 0
    while done < args.tokens:
        n = min(per_round, args.tokens - done)
        ours += time_steps(jdec, n)
        theirs += time_steps(tdec, n)
        done += n
    res["context_at_start"] = len(prompt) + args.warmup
    res["context_at_end_ours"] = jdec.context()
    res["context_at_end_torch"] = tdec.context()
    for name, ts in (("jax", ours), ("torch", theirs)):
        res[f"{name}_ms_median"] = 1e3 * statistics.median(ts)
        res[f"{name}_ms_mean"] = 1e3 * statistics.fmean(ts)
        res[f"{name}_ms_min"] = 1e3 * min(ts)
        res[f"{name}_tok_s"] = 1e3 / res[f"{name}_ms_median"]
    res["speedup"] = res["torch_ms_median"] / res["jax_ms_median"]

    # Bytes one decode token must read: every weight once (the tied embedding is read whole by the
    # LM head; the input-embedding gather is one row) + the valid K/V of all layers.
    itemsize = jnp.dtype(cfg.dtype).itemsize
    kv_bytes = 2 * cfg.num_layers * (len(prompt) + args.warmup) * cfg.num_kv_heads * cfg.head_dim * itemsize
    res["n_params"] = n_params
    res["weight_bytes"] = param_bytes
    res["kv_bytes"] = kv_bytes
    res["bytes_per_token"] = param_bytes + kv_bytes
    res["weight_sweep_ms"] = 1e3 * measure_weight_sweep(params, args.bw_repeats)

    del jdec, tdec, params
    gc.collect()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer tokens, smaller bandwidth array")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--context", type=int, default=300, help="prompt tokens before decoding (default 300)")
    ap.add_argument("--tokens", type=int, default=None, help="timed decode steps per side (default 32; quick 8)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps per side first")
    ap.add_argument("--rounds", type=int, default=4, help="alternate ours/torch in this many blocks")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--checkpoint", help="reuse (or create) the random HF checkpoint in this directory")
    ap.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = 8 if args.quick else 32
    if args.quick:
        args.rounds = min(args.rounds, 2)
    args.bw_repeats = 3 if args.quick else 5

    t_start = time.perf_counter()
    import torch
    import transformers
    torch.set_num_threads(args.torch_threads)
    transformers.logging.set_verbosity_error()

    env = {
        "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "jax_devices": [str(d) for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "OPENBLAS": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")},
    }
    log(f"[env] {env}")
    load_start = os.getloadavg()

    tmp = None
    directory = args.checkpoint
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="qwen2_05b_random_")
        directory = tmp.name
    build_s = 0.0
    if not os.path.exists(os.path.join(directory, "config.json")):
        log("[build] random Qwen2-0.5B-shaped model in torch + save_pretrained ...")
        build_s = build_checkpoint(directory, torch, transformers)
        log(f"[build] {build_s:.1f} s")

    log("[bandwidth] ...")
    bw = measure_bandwidth(0.5 if args.quick else 1.0, args.bw_repeats, torch)
    log(f"[bandwidth] {bw}")

    prompt = np.random.RandomState(0).randint(0, QWEN2_05B["vocab_size"], args.context).astype(np.int32)
    results = []
    for dtype_name in args.dtypes.split(","):
        log(f"[{dtype_name}] ...")
        r = run_dtype(dtype_name, directory, prompt, args, torch, transformers)
        r["loadavg_1min_after"] = os.getloadavg()[0]
        log(f"[{dtype_name}] {r}")
        results.append(r)

    best_bw = max(bw["numpy_sum"], bw["jax_sum"], bw["torch_sum"])
    for r in results:
        r["floor_ms"] = 1e3 * r["bytes_per_token"] / (best_bw * 1e9)
        r["weight_sweep_gb_s"] = r["weight_bytes"] / (r["weight_sweep_ms"] * 1e-3) / 1e9
        r["jax_effective_gb_s"] = r["bytes_per_token"] / (r["jax_ms_median"] * 1e-3) / 1e9
        r["torch_effective_gb_s"] = r["bytes_per_token"] / (r["torch_ms_median"] * 1e-3) / 1e9
        r["jax_vs_floor"] = r["jax_ms_median"] / r["floor_ms"]
    total_s = time.perf_counter() - t_start

    print()
    print(f"Decode, batch 1, context {args.context} (+{args.warmup} warm-up), {args.tokens} timed steps per side; "
          f"ms/token as median (best step)")
    head = (f"{'dtype':9} {'ours ms':>15} {'ours tok/s':>10} {'torch ms':>15} {'torch tok/s':>11} "
            f"{'speedup':>7} {'floor ms':>8} {'ours/floor':>10} {'sweep ms':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['dtype']:9} {r['jax_ms_median']:7.1f} ({r['jax_ms_min']:5.1f}) {r['jax_tok_s']:10.1f} "
              f"{r['torch_ms_median']:7.1f} ({r['torch_ms_min']:5.1f}) {r['torch_tok_s']:11.1f} "
              f"{r['speedup']:6.2f}x {r['floor_ms']:8.1f} {r['jax_vs_floor']:9.2f}x {r['weight_sweep_ms']:8.1f}")
    print()
    print(f"read bandwidth GB/s: numpy sum {bw['numpy_sum']:.1f}, jitted jnp.sum {bw['jax_sum']:.1f}, "
          f"torch sum {bw['torch_sum']:.1f} -> best {best_bw:.1f} (over {bw['array_gib']} GiB f32)")
    for r in results:
        print(f"{r['dtype']}: {r['n_params'] / 1e6:.1f} M params, {r['bytes_per_token'] / 1e9:.3f} GB read per "
              f"token (weights {r['weight_bytes'] / 1e9:.3f} + KV {r['kv_bytes'] / 1e6:.1f} MB); "
              f"one jitted sweep over all weights {r['weight_sweep_ms']:.1f} ms ({r['weight_sweep_gb_s']:.1f} GB/s); "
              f"effective GB/s ours {r['jax_effective_gb_s']:.1f}, torch {r['torch_effective_gb_s']:.1f}")
        print(f"   prefill logits max|ours - torch| {r['prefill_logits_max_abs_diff']:.2e}; same greedy token "
              f"after warm-up: {r['same_greedy_tokens_after_warmup']}; load ours {r['jax_load_s']:.1f} s, "
              f"torch {r['torch_load_s']:.1f} s; our decode compile {r['jax_decode_compile_s']:.1f} s")
    load_end = os.getloadavg()
    print(f"checkpoint build {build_s:.1f} s; total {total_s:.1f} s; load average (1 min) {load_start[0]:.1f} at start, "
          f"{load_end[0]:.1f} at end on {os.cpu_count()} CPUs")
    if max(load_start[0], load_end[0]) > (os.cpu_count() or 1) + 0.5:
        print("WARNING: the machine was busy with other work; timings (torch's 2-thread OpenMP most of all) "
              "are inflated and noisy. Rerun on an idle machine for reference numbers.")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "env": env, "bandwidth_gb_s": bw,
                       "best_bandwidth_gb_s": best_bw, "results": results, "build_s": build_s,
                       "total_s": total_s, "loadavg_start": load_start, "loadavg_end": load_end}, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
