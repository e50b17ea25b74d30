"""Streaming speech-input step on CPU: real-size encoder (+ adapter), ms per 160 ms chunk.

What it does:

1. Builds the released model's speech encoder (1024 x 24, rel-enc, chunk 4 / left 16) and
   ``subsampling`` adapter (1024 -> 2048 -> 3584) with random weights. When the official
   Freeze-Omni code is found (``--official``, default $FREEZE_OMNI_OFFICIAL or /work/official), the
   weights come from the official PyTorch modules and that code runs side by side as the peer
   (``speechEncoder.infer`` + ``CNNSubsampling`` with its cache, ``torch.no_grad``; bfloat16 via
   ``torch.autocast("cpu", bfloat16)`` as the official pipeline does on GPU), on the same weights
   converted by ``fo_jax.conversion.official_audiollm``.
2. For float32 and bfloat16 (our params and compute in that dtype; matmuls accumulate in float32):
   streams random fbank chunks (19 frames = 3 overlap + 16 new, the official framing) through
     * ``encoder``: ``encoder_stream_step`` jitted, state donated;
     * ``encoder+adapter``: ``speech_input_step_jit`` (what the listening step runs per chunk);
     * the PyTorch peer, encoder alone and encoder + adapter.
   20 warm-up calls first (compilation excluded; past the 17 calls after which the official key
   buffers are full, so both sides work on 68-key windows), then ``--chunks`` timed calls each,
   alternating sides in rounds of 5 so machine noise hits both (with a 0.3 s pause between
   sides, so one side's spinning worker threads do not run into the other's timing).
   ``block_until_ready`` per call.
   ``--quick``: 10 timed calls, and the PyTorch peer times the encoder alone.
3. Prints, per side: median and mean wall ms per chunk, real-time factor (ms / 160), and median
   CPU ms per chunk (process time, all threads: robust to other load), plus the load average.

Usage:
  .venv/bin/python benchmarks/encoder_stream.py [--quick] [--chunks 40] [--dtypes float32,bfloat16]
                                                [--no-torch] [--official PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fo_jax.config import load_config, model_config  # noqa: E402
from fo_jax.conversion.official_audiollm import convert_encoder_adapter  # noqa: E402
from fo_jax.models.adapter import SpeechInputState, speech_input_step_jit  # noqa: E402
from fo_jax.models.encoder import EncoderStreamState, encoder_stream_step, init_encoder_params  # noqa: E402

CHUNK_MS = 160.0
WARMUP = 20


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def official_modules(path, enc_cfg, ad_cfg, torch):
    """The official speechEncoder + CNNSubsampling at our config's sizes (random init), or None."""
    if not path or not os.path.isdir(os.path.join(path, "models", "encoder")):
        return None
    sys.path.insert(0, path)
    argv, sys.argv = sys.argv, [sys.argv[0]]  # the official encoder parses sys.argv
    try:
        from models.adapter import CNNSubsampling
        from models.encoder.cmvn import GlobalCMVN
        from models.encoder.encoder import speechEncoder
        d = enc_cfg.hidden_size
        overview = {"encoder-input-dim": enc_cfg.input_dim, "encoder-layer-config": "subsampling-transformer",
                    "encoder-output-dim": d}
        para = {"subsampling": {"subsampling-rate": 4, "subsampling-input-dim": enc_cfg.input_dim,
                                "subsampling-output-dim": d},
                "transformer": {"transformer-input-dim": d, "transformer-output-dim": d,
                                "transformer-attention-dim": d, "transformer-attention-heads": enc_cfg.num_heads,
                                "transformer-linear-units": enc_cfg.ffn_size,
                                "transformer-num-blocks": enc_cfg.num_layers,
                                "transformer-chunk_size": enc_cfg.chunk_size,
                                "transformer-left_chunks": enc_cfg.left_chunks, "transformer-dynamic-chunks": False,
                                "transformer-pos-enc-class": "rel-enc", "transformer-input-layer": "linear"}}
        torch.manual_seed(0)
        cmvn = GlobalCMVN(torch.randn(enc_cfg.input_dim), 0.5 + torch.rand(enc_cfg.input_dim))
        with contextlib.redirect_stdout(sys.stderr):
            enc = speechEncoder(enc_cfg.input_dim, overview, para, global_cmvn=cmvn).eval()
        adapter = CNNSubsampling(d, ad_cfg.output_dim, ad_cfg.kernel_size, ad_cfg.activation, ad_cfg.norm).eval()
        return enc, adapter
    finally:
        sys.argv = argv


def random_state_dict(enc_cfg, ad_cfg, seed=0):
    """Official-layout random weights without PyTorch (shapes from the conversion table)."""
    from fo_jax.conversion.official_audiollm import adapter_table, encoder_shapes
    rng = np.random.default_rng(seed)
    shapes = dict(encoder_shapes(enc_cfg))
    shapes.update({name: shape for name, _, shape in adapter_table(ad_cfg)})
    state = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}
    state["encoder.global_cmvn.mean"] = rng.standard_normal(enc_cfg.input_dim, dtype=np.float32)
    state["encoder.global_cmvn.istd"] = np.ones(enc_cfg.input_dim, np.float32)
    return state


def timed(fn, n):
    """(wall ms list, cpu ms list) of n calls of fn."""
    wall, cpu = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - w) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return wall, cpu


def summary(wall, cpu):
    med = statistics.median(wall)
    return {"median_ms": round(med, 1), "mean_ms": round(statistics.fmean(wall), 1),
            "rtf": round(med / CHUNK_MS, 3), "cpu_median_ms": round(statistics.median(cpu), 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="10 timed chunks per side; the PyTorch peer runs the encoder alone")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--official", default=os.environ.get("FREEZE_OMNI_OFFICIAL", "/work/official"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    chunks = 10 if args.quick else args.chunks
    rounds = max(1, chunks // 5)

    model = model_config(load_config("configs/freeze_omni.py"))
    enc_cfg, ad_cfg = model.encoder, model.adapter
    torch = None if args.no_torch else __import__("torch")
    peer = official_modules(args.official, enc_cfg, ad_cfg, torch) if torch else None
    if peer:
        state_dict = {"encoder." + k: v.numpy() for k, v in peer[0].state_dict().items()}
        state_dict.update({"adpter." + k: v.detach().numpy() for k, v in peer[1].state_dict().items()})
        log(f"weights: official modules from {args.official} (PyTorch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)")
    else:
        state_dict = random_state_dict(enc_cfg, ad_cfg)
        log("weights: random (official code not found or --no-torch: no PyTorch peer)")
    enc_np, ad_np, _ = convert_encoder_adapter(state_dict, enc_cfg, ad_cfg)
    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(jax.eval_shape(
        lambda r: init_encoder_params(enc_cfg, r), jax.random.PRNGKey(0))))
    rng = np.random.default_rng(0)
    feats = rng.normal(3.0, 2.0, (1, 16 * (WARMUP + chunks + 1) + 3, enc_cfg.input_dim)).astype(np.float32)
    windows = [feats[:, 16 * i:16 * i + 19] for i in range(WARMUP + chunks)]
    results = {}

    for name in args.dtypes.split(","):
        e_cfg = dataclasses.replace(enc_cfg, dtype=name, param_dtype=name)
        a_cfg = dataclasses.replace(ad_cfg, dtype=name, param_dtype=name)
        cast = lambda x: jnp.asarray(x, name if x.dtype == np.float32 and x.ndim > 1 else x.dtype)  # noqa: E731
        enc_params = jax.tree.map(cast, enc_np)
        ad_vars = jax.tree.map(cast, ad_np)
        enc_step = jax.jit(encoder_stream_step, static_argnums=1, donate_argnums=2)
        sides = {}
        state = {"enc": EncoderStreamState.zeros(e_cfg, 1), "both": SpeechInputState.zeros(e_cfg, a_cfg, 1)}
        cursor = {"enc": 0, "both": 0, "torch_enc": 0, "torch_both": 0}

        def ours_enc():
            state["enc"], out = enc_step(enc_params, e_cfg, state["enc"], windows[cursor["enc"]])
            out.block_until_ready()
            cursor["enc"] += 1

        def ours_both():
            state["both"], out = speech_input_step_jit(enc_params, ad_vars, e_cfg, a_cfg, state["both"],
                                                       windows[cursor["both"]])
            out.block_until_ready()
            cursor["both"] += 1

        sides[f"ours encoder {name}"] = ours_enc
        sides[f"ours encoder+adapter {name}"] = ours_both
        if peer:
            enc_mod, ad_mod = peer
            t_windows = [torch.from_numpy(w) for w in windows]
            t_state = {"enc": ([None] * enc_cfg.num_layers, 0), "both": ([None] * enc_cfg.num_layers, 0, None)}
            autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "bfloat16" else contextlib.nullcontext
            mask = torch.ones(1, 1, enc_cfg.chunk_size, dtype=torch.bool)

            def torch_enc():
                buf, idx = t_state["enc"]
                with torch.no_grad(), autocast():
                    _, buf, _, _, idx = enc_mod.infer(t_windows[cursor["torch_enc"]], buf, 0, None, idx)
                t_state["enc"] = (buf, idx)
                cursor["torch_enc"] += 1

            def torch_both():
                buf, idx, cache = t_state["both"]
                with torch.no_grad(), autocast():
                    out, buf, _, _, idx = enc_mod.infer(t_windows[cursor["torch_both"]], buf, 0, None, idx)
                    _, _, cache = ad_mod(out, mask, cache=cache, return_cache=True)
                t_state["both"] = (buf, idx, cache)
                cursor["torch_both"] += 1

            sides[f"official torch encoder {name}"] = torch_enc
            if not args.quick:
                sides[f"official torch encoder+adapter {name}"] = torch_both
        with _official_cpu_patch(torch) if peer else contextlib.nullcontext():
            for side, fn in sides.items():
                t = time.perf_counter()
                fn()
                log(f"{side}: first call (compile) {time.perf_counter() - t:.1f} s")
                timed(fn, WARMUP - 1)
            collected = {side: ([], []) for side in sides}
            for _ in range(rounds):
                for side, fn in sides.items():
                    time.sleep(0.3)  # let the other side's spinning worker threads go idle
                    w, c = timed(fn, chunks // rounds)
                    collected[side][0].extend(w)
                    collected[side][1].extend(c)
        for side, (w, c) in collected.items():
            results[side] = summary(w, c)
            log(f"{side:44s} {results[side]}")
        del enc_params, ad_vars, state

    report = {"benchmark": "encoder_stream", "encoder_params": n_params, "chunk_ms": CHUNK_MS,
              "timed_chunks": chunks, "results": results, "loadavg": os.getloadavg(),
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(f"\nencoder streaming step, {n_params / 1e6:.0f} M params, ms per 160 ms chunk "
          f"(load average {report['loadavg'][0]:.2f} on {report['cpus']} CPUs)")
    print(f"{'side':46s} {'median':>8s} {'mean':>8s} {'RTF':>6s} {'CPU ms':>8s}")
    for side, r in results.items():
        print(f"{side:46s} {r['median_ms']:8.1f} {r['mean_ms']:8.1f} {r['rtf']:6.2f} {r['cpu_median_ms']:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


@contextlib.contextmanager
def _official_cpu_patch(torch):
    """The official infer moves its positional table to 'cuda'; keep it on the CPU."""
    original = torch.Tensor.to

    def to(self, *a, **kw):
        return self if a and a[0] == "cuda" else original(self, *a, **kw)
    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


if __name__ == "__main__":
    main()
