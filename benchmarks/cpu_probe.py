"""What this CPU gives a streaming step: read bandwidth, and few-row matmuls by weight layout.

Every streaming step of Freeze-Omni (encoder chunk, LLM chunk or token, speech-decoder token) is a
chain of products of a few activation rows with large weights, so its floor is the time to read
the weights once. This probe prints:

1. Read bandwidth (``jnp.sum`` and numpy over 256 MB and 1 GB arrays): the floor's denominator.
2. For 1, 4 and 32 rows against 24 weights of 1024 x 4096 (400 MB float32, like one encoder's
   worth of FFN weights), float32 and bfloat16 weights, three formulations of the same product:
     * ``io x@W``:   weight stored (in, out) (Flax ``nn.Dense``), dot(x, W);
     * ``oi x@W^T``: weight stored (out, in) (PyTorch ``Linear``), dot(x, W) contracting W's last axis;
     * ``oi W@x^T``: the same weight, dot(W, x) -> (out, rows), transposed back.
   Best-of-N and median ms, and the effective GB/s of weight bytes.

Each candidate is timed in interleaved rounds (noise hits all of them alike); the minimum is the
best estimate of the undisturbed time on a shared machine. Results feed BENCHMARKS.md and the
choice of the dot formulation in ``fo_jax/layers/linear.py``.

Usage: .venv/bin/python benchmarks/cpu_probe.py [--rounds 15] [--rows 1,4,32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

LAYERS, K, N = 24, 1024, 4096


def _time(fn, rounds_out: list[float]) -> None:
    t = time.perf_counter()
    fn()
    rounds_out.append(time.perf_counter() - t)


def bandwidth(rounds: int) -> list[tuple[str, float]]:
    rows = []
    for mb in (256, 1024):
        a = jnp.ones((mb << 18,), jnp.float32)
        an = np.ones(mb << 18, np.float32)
        total = jax.jit(jnp.sum)
        total(a).block_until_ready()
        tj, tn = [], []
        for _ in range(rounds):
            _time(lambda: total(a).block_until_ready(), tj)
            _time(an.sum, tn)
        rows += [(f"jax sum {mb} MB", (mb << 20) / min(tj) / 1e9), (f"numpy sum {mb} MB", (mb << 20) / min(tn) / 1e9)]
    return rows


FORMS = {
    "io x@W": (False, lambda x, w: jnp.einsum("bk,kn->bn", x, w, preferred_element_type=jnp.float32)),
    "oi x@W^T": (True, lambda x, w: jnp.einsum("bk,nk->bn", x, w, preferred_element_type=jnp.float32)),
    "oi W@x^T": (True, lambda x, w: jnp.einsum("nk,bk->nb", w, x, preferred_element_type=jnp.float32).T),
}


def matmuls(rows_list: list[int], rounds: int) -> list[tuple[str, float, float, float]]:
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((K, N), np.float32) * 0.02 for _ in range(LAYERS)]
    cands = []
    for dtype in (jnp.float32, jnp.bfloat16):
        io = [jnp.asarray(w, dtype) for w in weights]
        oi = [jnp.asarray(np.ascontiguousarray(w.T), dtype) for w in weights]
        nbytes = LAYERS * K * N * jnp.dtype(dtype).itemsize
        for rows in rows_list:
            x = jnp.asarray(rng.standard_normal((rows, K), np.float32)).astype(dtype)
            for name, (transposed, form) in FORMS.items():
                ws = oi if transposed else io
                f = jax.jit(lambda x, ws, form=form: [form(x, w) for w in ws])
                run = lambda f=f, x=x, ws=ws: jax.block_until_ready(f(x, ws))  # noqa: E731
                run()
                cands.append((f"{jnp.dtype(dtype).name:8s} rows={rows:<3d} {name}", run, nbytes, []))
    for _ in range(rounds):
        for _, run, _, ts in cands:
            _time(run, ts)
    return [(name, min(ts) * 1e3, statistics.median(ts) * 1e3, nbytes / min(ts) / 1e9)
            for name, _, nbytes, ts in cands]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rows", default="1,4,32")
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, load {os.getloadavg()[0]:.2f}")
    for name, gbs in bandwidth(args.rounds):
        print(f"{name:24s} {gbs:6.1f} GB/s")
    print(f"{'matmul (24 x 1024x4096)':34s} {'best ms':>8s} {'median':>8s} {'GB/s':>6s}")
    for name, best, med, gbs in matmuls([int(r) for r in args.rows.split(",")], args.rounds):
        print(f"{name:34s} {best:8.1f} {med:8.1f} {gbs:6.1f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
