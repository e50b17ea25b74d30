"""A stage's train step on a mesh: 8 fake CPU devices in one process, and two real processes
joined by ``jax.distributed.initialize`` (4 fake devices each), against one device.

The stage is ``speech_in_llm`` (speech-in 2: trainable encoder + adapter feeding the frozen LLM),
run end to end by ``fo-jax train``: the trainer's mesh, shardings, per-process data and
checkpoints. Every run is a subprocess: XLA_FLAGS must be set before jax is imported.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fo_jax.training.checkpoint import load_trained
from tests.speech_stage_utils import speech_world

ROOT = Path(__file__).resolve().parent.parent

# Trains (workdir, overrides, max_steps) runs given as JSON; reports the losses, the step's
# compilations (one: the second step must reuse the first's program) and the process layout.
TRAIN = textwrap.dedent("""
    import json, sys
    from fo_jax.runtime import CompileCounter, enable_compilation_cache
    enable_compilation_cache()
    counter = CompileCounter()
    import jax
    from fo_jax.config import load_config
    from fo_jax.training import trainer
    for workdir, overrides, max_steps in json.loads(sys.argv[1]):
        before = counter.count
        cfg = load_config("configs/speech_in_stage2.py:tiny", overrides)
        trainer.train(cfg, workdir, max_steps=max_steps, progress=False)
        steps = [n for n in counter.names_since(before) if n == "jit(step)"]
        losses = ([json.loads(l)["loss"] for l in open(workdir + "/metrics.jsonl")]
                  if jax.process_index() == 0 else None)
        print("REPORT", json.dumps({"losses": losses, "step_compiles": len(steps), "processes": jax.process_count(),
                                    "devices": jax.device_count()}))
""")

# Dropout and SpecAugment draw per row: two processes' rows are the global batch's in another
# order (each process plans its own half-batches), so the cross-process comparison runs without them.
DETERMINISTIC = ["model.encoder.dropout=0.0", "model.encoder.positional_dropout=0.0", "stage.spec_augment={}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    speech_world(root)  # 8 usable utterances in one bucket: every global batch holds all of them
    return root


def _overrides(world, *extra):
    return [f"stage.tokenizer={world / 'tok'}", f"stage.manifest={world / 'asr.jsonl'}", "model.llm.num_layers=1",
            "model.encoder.num_layers=1", "stage.steps=3", "stage.log_every=1", "stage.buckets=(256,)",
            "stage.batch_size=8", "optimizer.schedule=constant", "optimizer.warmup_steps=1", "optimizer.lr=0.003",
            *extra]


def _env(devices, **extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                **extra)


def _reports(stdout):
    return [json.loads(l.split(" ", 1)[1]) for l in stdout.splitlines() if l.startswith("REPORT")]


def _train(runs, devices):
    r = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(runs)], cwd=ROOT, env=_env(devices),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return _reports(r.stdout)


def _close(a, b):
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)


def test_speech_in_llm_step_on_8_devices_matches_1_device(world, tmp_path):
    # Mesh data x fsdp x tensor = 2 x 2 x 2, dropout and SpecAugment on: the RNG draws the same
    # numbers whatever the sharding, and the second step reuses the first's program.
    [one] = _train([[str(tmp_path / "one"), _overrides(world), None]], 1)
    [eight] = _train([[str(tmp_path / "eight"), _overrides(world, "mesh.shape=(2, 2, 2)"), None]], 8)
    assert one["devices"] == 1 and eight["devices"] == 8 and eight["step_compiles"] == 1
    _close(eight["losses"], one["losses"])
    assert one["losses"][-1] < one["losses"][0]


def test_speech_in_llm_step_in_2_processes_matches_1_device(world, tmp_path):
    """Two processes x 4 devices joined by jax.distributed.initialize (the FO_JAX_* settings the
    launchers use), one global mesh; each process loads its own half of every batch. Two steps,
    then a resume from their checkpoint (written by both processes) for the third."""
    [one] = _train([[str(tmp_path / "one"), _overrides(world, *DETERMINISTIC), None]], 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multi = [str(tmp_path / "multi"), _overrides(world, "mesh.shape=(2, 2, 2)", *DETERMINISTIC)]
    runs = json.dumps([multi + [2], multi + [None]])
    procs = [subprocess.Popen([sys.executable, "-c", TRAIN, runs], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(4, FO_JAX_COORDINATOR=f"127.0.0.1:{port}", FO_JAX_NUM_PROCESSES="2",
                                       FO_JAX_PROCESS_ID=str(pid)))
             for pid in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    first, second = (_reports(out)[-1] for out, _ in outs)
    assert first["processes"] == second["processes"] == 2 and first["devices"] == 8
    assert first["step_compiles"] == second["step_compiles"] == 1
    assert second["losses"] is None  # process 0 alone logs into the shared work directory
    _close(first["losses"], one["losses"])
    # The final checkpoint loads on this one-device process (as the next stage's start does).
    trained, meta = load_trained(tmp_path / "multi")
    assert meta["step"] == 3 and set(trained) == {"encoder", "adapter", "task_embeddings"}
