"""Speech-decoder speed on CPU: our jitted prefill / ``decode_step`` vs the official PyTorch decoder.

What it does:

1. Builds the real-size decoder (896 wide, 4 shared + 4 prefix + 2 pre-network LLaMA blocks,
   FFN 4864, 14 heads, 1028-way head). When the official Freeze-Omni code is found (``--official``,
   default ``../official`` next to this checkout), its ``LLM2TTSCodecAR`` module is built with the
   dims of ``checkpoints/decoder/model.json`` and random weights, and its state dict is converted
   with ``fo_jax.conversion.official_decoder`` -- both sides run the very same weights. The end
   token is suppressed on both sides so every run decodes the full token budget.
2. For float32 and bfloat16, on segments of N text-embedding frames and N hidden-state frames
   (896-d decoder frames; one 3584-d LLM vector = 4 frames), N in ``--frames`` (default 20 -- the
   issue's target size -- and 80, i.e. 20 LLM tokens):
     * prefill: ours = ``fo_jax.inference.speech_decoder.start`` (bucketing, cache allocation,
       jitted prefix pass + jitted pre-network/context pass); torch = the release's ``infer`` up
       to the first AR step (pre-network, prefix layers into a DynamicCache, shared layers).
     * AR token: one step of top-k 2 sampling, as released; ours = ``decode_step`` (jitted, state
       donated) with the token read back to the host every step (streaming); torch = the body of
       the release's ``infer`` loop (embedding, 4 layers on the cache, norm, head, softmax, top-k,
       multinomial) under ``torch.inference_mode`` with 2 threads and eager attention (what a bare
       LlamaConfig gave the release).
   The release's ``infer`` calls the layers with the transformers 4.45 API (it reads
   ``layer_outputs[0]`` and passes ``past_key_value``), which transformers 5 no longer accepts,
   so the torch side drives the official module's own submodules with the current API.
   Sides alternate in rounds so that machine noise hits both; we report medians. Compilation is
   excluded (warm-up first).
3. A "floor" line: a jitted pass of plain matvecs reading every weight one AR step reads (4
   shared blocks + head), timed next to each of our AR steps -- how far a step is from the
   machine's memory bandwidth.

Usage:
  .venv/bin/python benchmarks/speech_decoder.py [--quick] [--json OUT] [--tokens 64] [--rounds 3]
      [--frames 20,80] [--dtypes float32,bfloat16] [--no-torch]
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

import numpy as np

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fo_jax.config import load_config, model_config  # noqa: E402
from fo_jax.conversion.official_decoder import convert_state_dict  # noqa: E402
from fo_jax.inference import speech_decoder as inf  # noqa: E402
from fo_jax.layers.linear import project  # noqa: E402
from fo_jax.models.speech_decoder import init_params  # noqa: E402

RELEASE_ARGS = dict(idim=896, odim=1024, encoder_pre_norm_type="ln", encoder_drop_rate=0.1,
                    encoder_criterion="ce", encoder_upsample_rate=9, kv_cache_prefix_finetune=1,
                    transformer_attention_dim=896, transformer_linear_units=4864, transformer_num_blocks=4,
                    transformer_attention_heads=14, transformer_dropout_rate=0.1, encoder_output_dim=896)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def official_module(path: str):
    """The release's LLM2TTSCodecAR with random weights, or None when its code is not importable."""
    if not os.path.isdir(os.path.join(path, "models", "decoder")):
        return None
    sys.path.insert(0, path)
    try:
        import argparse as ap

        import torch
        from models.decoder.decoder import LLM2TTSCodecAR
    except Exception as e:  # noqa: BLE001 - optional peer
        log(f"official decoder not importable from {path}: {type(e).__name__}: {e}")
        return None
    torch.manual_seed(0)
    model = LLM2TTSCodecAR(896, 1024, ap.Namespace(**RELEASE_ARGS)).eval()
    for layer in [*model.layers_pre_nn, *model.layers, *model.layers_prefix]:
        layer.self_attn.config._attn_implementation = "eager"
    with torch.no_grad():
        model.out_fnn.bias[1024 + 2] = -1e4  # end token off: fixed-length runs
    return model


class TorchRunner:
    """The release's ``infer`` (prefill + top-k AR loop) over the official module's submodules."""

    def __init__(self, model, dtype):
        import torch
        from transformers.cache_utils import DynamicCache

        self.torch, self.DynamicCache = torch, DynamicCache
        self.m = model.to(dtype)
        self.dtype = dtype

    def _layers(self, layers, rotary, x, offset, cache):
        t = x.shape[1]
        emb = rotary(x, self.torch.arange(offset, offset + t)[None])
        for layer in layers:
            x = layer(x, attention_mask=None, position_embeddings=emb, cache=cache, use_cache=cache is not None)
        return x

    def prefill(self, text, hidden):
        m, torch = self.m, self.torch
        x = self._layers(m.layers_pre_nn, m.rotary_emb_pre_nn, text, 0, None)
        x = torch.cat([m.embedding(torch.full((1, 1), 1024)), x], 1)
        cache = self.DynamicCache()
        self._layers(m.layers_prefix, m.rotary_emb_prefix, hidden, 0, cache)
        self._layers(m.layers, m.rotary_emb, x, 0, cache)
        self.cache, self.prefix = cache, hidden.shape[1]
        self.token = torch.full((1, 1), 1025)

    def step(self, top_k=2):
        m, torch = self.m, self.torch
        pos = self.cache.get_seq_length() - self.prefix
        h = self._layers(m.layers, m.rotary_emb, m.embedding(self.token), pos, self.cache)
        logits = m.out_fnn(m.norm(h))[0, 0]
        probs = torch.softmax(logits, -1)
        top, idx = torch.topk(probs, top_k)
        probs = torch.zeros_like(probs).scatter_(0, idx, top)
        self.token = torch.multinomial(probs / probs.sum(), 1)[None]
        return int(self.token)


def weight_floor(params, cfg):
    """A jitted pass that reads each weight an AR step reads once (matvecs only): the memory floor."""
    mats = [params["out_fnn"]["kernel"]]  # every kernel as (out, in), the layout they are stored in
    for i in range(cfg.num_layers):
        layer = params[f"layers_{i}"]
        mats += [layer["self_attn"][n]["kernel"].reshape(-1, cfg.hidden_size)
                 for n in ("q_proj", "k_proj", "v_proj")]
        mats += [layer["self_attn"]["o_proj"]["kernel"].reshape(cfg.hidden_size, -1)]
        mats += [layer["mlp"][n]["kernel"] for n in ("gate_proj", "up_proj", "down_proj")]
    x = jnp.ones((1, cfg.intermediate_size), mats[0].dtype)

    @jax.jit
    def run(x, mats):
        return sum(jnp.sum(project(x[:, : m.shape[1]], m, 1, m.dtype, jnp.float32)) for m in mats)

    run(x, mats).block_until_ready()
    return lambda: run(x, mats).block_until_ready()


def _timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 round, 2 prefills per size")
    ap.add_argument("--tokens", type=int, default=64, help="AR tokens per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefills", type=int, default=5, help="prefills per size per round")
    ap.add_argument("--frames", default="20,80", help="prefill sizes: decoder frames of text and of hidden "
                    "states each (4 frames per LLM vector); the first size is also the AR context")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--official", default=os.path.join(os.path.dirname(ROOT), "official"))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.rounds, args.prefills = 16, 1, 2
    sizes = [int(f) for f in args.frames.split(",")]

    base = model_config(load_config(os.path.join(ROOT, "configs", "freeze_omni.py"))).decoder
    model = None if args.no_torch else official_module(args.official)
    if model is not None:
        import torch

        torch.set_num_threads(2)
        sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        params32 = convert_state_dict(sd, base)
    else:
        import flax.linen as nn

        params32 = jax.tree.map(np.array, nn.unbox(init_params(base, jax.random.key(0))))  # writable copies
        params32["out_fnn"]["bias"][base.end_id] = -1e4
    rng = np.random.default_rng(0)
    inputs = {f: ((0.02 * rng.standard_normal((f, base.hidden_size))).astype(np.float32),
                  rng.standard_normal((f, base.hidden_size)).astype(np.float32)) for f in sizes}

    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "jax": jax.__version__, "backend": jax.default_backend(), "frames": sizes, "tokens": args.tokens,
               "rounds": args.rounds, "official_torch": model is not None, "load_before": os.getloadavg(),
               "runs": {}}
    for dtype in args.dtypes.split(","):
        cfg = dataclasses.replace(base, dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params32)
        sampling = inf.TokenSampling.from_config(cfg)

        def ours_prefill(f):
            state = inf.start(params, cfg, *inputs[f], sampling=sampling)
            jax.block_until_ready(state.cache.k)
            return state

        def ours_step(state):
            state, token = inf.decode_step(params, state, cfg=cfg, sampling=sampling)
            return state, int(token[0])

        floor = weight_floor(params, cfg)
        t0 = time.perf_counter()
        for f in sizes:
            state = ours_prefill(f)
        state = ours_prefill(sizes[0])
        state, _ = ours_step(state)
        log(f"[{dtype}] ours compiled in {time.perf_counter() - t0:.1f} s")
        runner = None
        if model is not None:
            runner = TorchRunner(model, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype])
            torch_inputs = {f: tuple(torch.tensor(x[None]).to(runner.dtype) for x in inputs[f]) for f in sizes}
            with torch.inference_mode():
                runner.prefill(*torch_inputs[sizes[0]])
                runner.step()
        times = {}
        for r in range(args.rounds):
            for f in sizes:
                for _ in range(args.prefills):
                    state, ms = _timed(ours_prefill, f)
                    times.setdefault(f"ours_prefill_{f}", []).append(ms)
            for _ in range(args.tokens):
                (state, _), ms = _timed(ours_step, state)
                times.setdefault("ours_token", []).append(ms)
                _, ms = _timed(floor)
                times.setdefault("floor_token", []).append(ms)
            if runner is not None:
                with torch.inference_mode():
                    for f in sizes[::-1]:  # ends with the AR context size
                        for _ in range(args.prefills):
                            _, ms = _timed(runner.prefill, *torch_inputs[f])
                            times.setdefault(f"torch_prefill_{f}", []).append(ms)
                    for _ in range(args.tokens):
                        _, ms = _timed(runner.step)
                        times.setdefault("torch_token", []).append(ms)
            log(f"[{dtype}] round {r + 1}: "
                + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.items()))
        results["runs"][dtype] = {
            k: {"median_ms": statistics.median(v), "mean_ms": statistics.fmean(v), "n": len(v)}
            for k, v in times.items()}
    results["load_after"] = os.getloadavg()

    print(f"speech decoder, real size, CPU ({results['cpus']} cores, load {results['load_before'][0]:.1f} -> "
          f"{results['load_after'][0]:.1f}); medians in ms; prefill over N text + N hidden-state frames "
          f"(896-d, 4 per LLM vector); AR = one top-k 2 token after the {sizes[0]} + {sizes[0]} prefill")
    head = "".join(f"{f'prefill {f}+{f}':>16}" for f in sizes)
    print(f"{'dtype':9} {'side':6}{head} {'AR token':>9} {'tokens/s':>9} {'s compute / s speech':>21}")
    for dtype, run in results["runs"].items():
        for side in ("ours", "torch"):
            if f"{side}_token" not in run:
                continue
            t = run[f"{side}_token"]["median_ms"]
            pre = "".join(f"{run[f'{side}_prefill_{f}']['median_ms']:16.2f}" for f in sizes)
            print(f"{dtype:9} {side:6}{pre} {t:9.2f} {1000 / t:9.1f} {40 * t / 1000:21.3f}")
        print(f"{dtype:9} {'floor':6}{'':>{16 * len(sizes)}} {run['floor_token']['median_ms']:9.2f}   "
              "(jitted matvecs over the weights one AR step reads: the memory floor, where matvecs "
              "run at memory speed)")
    print("targets (ours, float32): AR token <= 8 ms, prefill 20 + 20 frames <= 45 ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
