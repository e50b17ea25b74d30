"""The train step on a mesh: 8 fake CPU devices in one process, and two real processes.

Both run in subprocesses: XLA_FLAGS must be set before jax is imported.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The same tiny stage in every configuration: LM loss, a trainable subset, a fixed global batch.
COMMON = textwrap.dedent("""
    import functools, json, sys
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from fo_jax import sharding
    from fo_jax.models.qwen2 import init_params
    from fo_jax.training import lm
    from fo_jax.training.distributed import global_batch, initialize
    from fo_jax.training.freeze import split_trainable
    from fo_jax.training.optim import OptimizerConfig, make_optimizer
    from fo_jax.training.step import make_train_step
    from tests.conftest import TINY_LLM as cfg

    def loss_fn(params, batch, rng):
        return lm.next_token_loss(params, cfg, batch["tokens"], batch["mask"]), {}

    rows = np.random.default_rng(0).integers(3, cfg.vocab_size, (8, 16)).astype(np.int32)
    GLOBAL = {"tokens": rows, "mask": np.ones((8, 16), np.float32)}

    def run(mesh, local_batch):
        init = functools.partial(init_params, cfg)
        params, _ = sharding.init_sharded(init, jax.random.key(0), mesh)
        trainable, frozen = split_trainable(params, [r"^layers_1/", r"^norm/"])
        optimizer = make_optimizer(OptimizerConfig(lr=1e-2, schedule="constant", warmup_steps=1))
        opt_state = optimizer.init(trainable)
        step = make_train_step(loss_fn, optimizer)
        batch = global_batch(local_batch, mesh)
        losses = []
        for i in range(3):
            trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, jax.random.key(i))
            losses.append(float(metrics["loss"]))
        return losses
""")

SINGLE = COMMON + textwrap.dedent("""
    n = int(sys.argv[1])
    mesh = sharding.make_mesh((2, 2, 2) if n == 8 else (1, 1, 1), jax.devices()[:n])
    print("LOSSES", json.dumps(run(mesh, GLOBAL)))
""")

MULTI = COMMON + textwrap.dedent("""
    pid = int(sys.argv[1])
    assert initialize(sys.argv[2], 2, pid)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = sharding.make_mesh((2, 2, 2))
    local = {k: v[pid * 4:(pid + 1) * 4] for k, v in GLOBAL.items()}  # this process's rows
    print("LOSSES", json.dumps(run(mesh, local)))
""")


def _env(devices):
    return dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _losses(stdout):
    import json

    return json.loads([l for l in stdout.splitlines() if l.startswith("LOSSES")][-1].split(" ", 1)[1])


def _single(devices):
    r = subprocess.run([sys.executable, "-c", SINGLE, str(devices)], cwd=ROOT, env=_env(8), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return _losses(r.stdout)


def test_train_step_on_8_devices_matches_1_device_and_2_processes():
    one, eight = _single(1), _single(8)
    assert max(abs(a - b) for a, b in zip(one, eight)) <= 1e-5, (one, eight)
    assert one[-1] < one[0]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", MULTI, str(pid), f"127.0.0.1:{port}"], cwd=ROOT,
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outs:
        multi = _losses(out)
        assert max(abs(a - b) for a, b in zip(one, multi)) <= 1e-5, (one, multi)
