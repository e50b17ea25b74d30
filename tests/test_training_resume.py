"""Exact resume after a real kill: speech-in stage 1 (SpecAugment, dropout, two length buckets)
trained 2N steps straight vs N steps, SIGKILL, resume, N steps: bitwise the same params,
optimizer state and batches in the same order."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np

from fo_jax.config import load_config
from fo_jax.training import trainer
from tests.speech_stage_utils import speech_world

ROOT = Path(__file__).resolve().parent.parent
N = 3

# Trains the config; when the loop asks to save step N + 1 (checkpoint N complete, step N + 1
# computed and logged, not saved), the process kills itself: nothing after checkpoint N survives.
KILLED = textwrap.dedent("""
    import json, os, signal, sys
    from fo_jax.runtime import enable_compilation_cache
    enable_compilation_cache()
    from fo_jax.config import load_config
    from fo_jax.training import trainer
    from fo_jax.training.checkpoint import TrainCheckpointer
    workdir, overrides, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    save = TrainCheckpointer.save

    def save_or_die(self, step, *args, **kwargs):
        if step == n + 1:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, step, *args, **kwargs)

    TrainCheckpointer.save = save_or_die
    trainer.train(load_config("configs/speech_in_stage1.py:tiny", overrides), workdir, progress=False)
""")


def _metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_kill_is_bitwise_the_straight_run(tmp_path):
    speech_world(tmp_path)  # 8 tones of 1.2 .. 1.9 s: 5 fall in the 160-frame bucket, 3 in the 256 one
    overrides = [f"stage.manifest={tmp_path / 'asr.jsonl'}", "model.encoder.num_layers=1", f"stage.steps={2 * N}",
                 f"stage.save_every={N}", "stage.log_every=1", "stage.batch_size=2", "stage.buckets=(160, 256)"]
    cfg = load_config("configs/speech_in_stage1.py:tiny", overrides)
    straight = trainer.train(cfg, tmp_path / "straight", progress=False)

    killed = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "resumed"), json.dumps(overrides), str(N)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [m["step"] for m in _metrics(tmp_path / "resumed")] == list(range(1, N + 2))  # step N + 1 ran, unsaved
    resumed = trainer.train(cfg, tmp_path / "resumed", progress=False)

    assert resumed["step"] == straight["step"] == 2 * N
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["trainable"]),
                 jax.device_get(straight["trainable"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["opt_state"]),
                 jax.device_get(straight["opt_state"]))
    # Same batches in the same order: every step's loss and frame count, bitwise, step N + 1's
    # twice (the killed run's and the resumed run's).
    straight_m, resumed_m = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert resumed_m == straight_m[:N + 1] + straight_m[N:]
    assert len({m["frames"] for m in straight_m}) > 1  # the batches differ: their order is checked
