"""Speech-in stage 1 (encoder + CTC) on a few synthesized utterances."""

import json

import jax
import numpy as np
import pytest

from fo_jax.audio.io import write_wav
from fo_jax.config import load_config
from fo_jax.data.manifest import write_manifest
from fo_jax.training import trainer
from fo_jax.training.checkpoint import load_trained
from fo_jax.training.freeze import fingerprint, flatten
from fo_jax.training.speech_common import cmvn_params
from tests.speech_stage_utils import assert_moments_only_for

speech = pytest.importorskip("fo_jax.testing.speech")
pytest.importorskip("espeakng_loader")

SENTENCES = ["what is two plus three", "the sky is blue", "count from one to four", "hello there",
             "paris is in france", "grass is green", "seven minus two", "good morning"]


@pytest.fixture(scope="module")
def asr_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    records = []
    for i, text in enumerate(SENTENCES):
        write_wav(root / f"{i}.wav", speech.synthesize(text, "espeak", rate=200), 16000)
        records.append({"audio": f"{i}.wav", "text": text.capitalize() + "?"})
    records.append({"audio": "missing.wav", "text": "never used"})
    # 0.4 s of speech (8 encoder frames) cannot carry this transcript: CTC has no path for it
    records.append({"audio": "0.wav", "text": "ab" * 20, "duration": 0.4})
    write_manifest(root / "asr.jsonl", records)
    return root / "asr.jsonl"


def test_ctc_stage_trains_with_frozen_cmvn(tmp_path, asr_manifest):
    cfg = load_config("configs/speech_in_stage1.py:tiny",
                      [f"stage.manifest={asr_manifest}", "stage.steps=12", "stage.batch_size=4", "stage.log_every=1",
                       "stage.buckets=(256,)", "optimizer.warmup_steps=2", "optimizer.lr=3e-3"])
    before = trainer.train(cfg, tmp_path / "run0", max_steps=0, progress=False)
    summary = trainer.train(cfg, tmp_path / "run", progress=False)
    assert summary["step"] == 12
    # The frozen leaves after 12 steps, bitwise the ones the run started from.
    assert fingerprint(summary["frozen"]) == summary["frozen_fingerprint"] == before["frozen_fingerprint"]
    assert_moments_only_for(summary["opt_state"], summary["trainable"])  # no moments for CMVN
    assert set(flatten(summary["frozen"])) == {"encoder/cmvn_mean", "encoder/cmvn_istd"}
    mean = np.asarray(summary["frozen"]["encoder"]["cmvn_mean"])
    assert mean.shape == (80,) and np.abs(mean).max() > 1  # estimated from the audio, not identity
    assert any("missing.wav" in r for r in summary["rejected"])
    assert any("40 CTC frames needed, 8 encoder frames" in r for r in summary["rejected"]), summary["rejected"]
    # The frozen statistics ride in the run's meta, for the stages that start from this encoder.
    trained, meta = load_trained(tmp_path / "run")
    assert set(trained) == {"encoder", "ctc"} and "cmvn_mean" not in trained["encoder"]
    np.testing.assert_array_equal(cmvn_params(meta["cmvn_stats"])["cmvn_mean"], mean)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(losses).all() and min(losses[-3:]) < 0.9 * losses[0]
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(summary["trainable"]["ctc"]),
                                                        jax.tree.leaves(before["trainable"]["ctc"])))
