"""Training-step throughput of speech-in stage 1 (encoder + CTC, ``speech_in_ctc``) on CPU, in
fbank frames per second, at the ``tiny`` and ``mid`` presets of ``configs/speech_in_stage1.py``.

The utterances are noisy tones (the step's cost depends on shapes, not on what is said), all of
one length bucket so the timed loop never recompiles; ``--manifest`` takes real speech instead.
Timing is ``training_stages.time_stage``'s: the trainer's loop (grain batch with fbank +
SpecAugment, device put, jitted step, ``block_until_ready``), two warm-up steps (the first,
mostly compilation, reported apart), then ``--steps`` timed steps. Frames/s counts the valid
(unpadded) fbank frames of each batch (10 ms each); padded frames/s counts batch x bucket.

Usage:
  .venv/bin/python benchmarks/speech_in_training.py [--presets tiny mid] [--steps 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec import matmul_gflops  # noqa: E402
from training_stages import report, time_stage  # noqa: E402

from fo_jax.audio.io import write_wav  # noqa: E402
from fo_jax.config import load_config  # noqa: E402
from fo_jax.data.manifest import write_manifest  # noqa: E402
from fo_jax.runtime import enable_compilation_cache  # noqa: E402

WORDS = "what is two plus three the sky blue count from one to four hello there paris france".split()


def tone_manifest(folder: Path, count: int, seconds: float) -> Path:
    """``count`` noisy tones of ``seconds`` each with random few-word transcripts."""
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    records = []
    for i in range(count):
        wav = 0.3 * np.sin(2 * np.pi * (150 + 20 * i) * t) + 0.01 * rng.normal(size=t.size)
        write_wav(folder / f"{i}.wav", wav.astype(np.float32), 16000)
        records.append({"audio": f"{i}.wav", "text": " ".join(rng.choice(WORDS, 6))})
    write_manifest(folder / "asr.jsonl", records)
    return folder / "asr.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=4.5, help="tone length (4.5 s: the 512-frame bucket)")
    ap.add_argument("--manifest", help="real {audio, text} manifest instead of tones")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    enable_compilation_cache()
    results = {"load_before": os.getloadavg(), "matmul_gflops_before": round(matmul_gflops(), 1)}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            cfg = load_config(f"configs/speech_in_stage1.py:{preset}")
            manifest = args.manifest or tone_manifest(Path(tmp), 2 * cfg.stage.batch_size, args.seconds)
            cfg = load_config(f"configs/speech_in_stage1.py:{preset}", [f"stage.manifest={manifest}"])
            out = time_stage(cfg, args.steps)
            feats = out["batch"]["feats"]
            out["frames_per_s"] = round(out["steps_per_s"] * out["metrics"]["frames"], 1)
            out["padded_frames_per_s"] = round(out["steps_per_s"] * feats[0] * feats[1], 1)
            out["encoder"] = {k: cfg.model.encoder[k] for k in ("hidden_size", "num_layers", "ffn_size")}
            results[preset] = out
            print(preset, json.dumps(out), flush=True)
    report(results, args.json)


if __name__ == "__main__":
    main()
