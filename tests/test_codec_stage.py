"""Stage ``codec`` (speech-out 1): the two-optimizer GAN step, exact resume, frozen leaves, and codec
tokens written through the ``SpeechCodec`` interface (``fo-jax prepare-codec``)."""

import json
import shutil

import jax
import numpy as np
import pytest

from fo_jax.cli.main import main
from fo_jax.config import load_config
from fo_jax.data.codec_tokens import TOKENS_FIELD, prepare_codec_tokens
from fo_jax.data.manifest import ManifestError, write_manifest
from fo_jax.errors import LoadError
from fo_jax.models.codec import fold_weight_norm
from fo_jax.training import trainer
from fo_jax.training.freeze import flatten
from fo_jax.training.stages import build_stage
from fo_jax.training.stages.codec import load_speech_codec
from tests.speech_out_data import write_clips

N = 2  # steps before the interruption; runs train 2N
FROZEN = "^codec/encoder/conv_pre/"  # a frozen piece: the rest (running statistics included) trains


def _config(manifest):
    return load_config("configs/speech_out_stage1.py:tiny", [
        f"stage.manifest={manifest}", f"stage.steps={2 * N}", "stage.batch_size=2", "stage.log_every=1",
        f"stage.save_every={N}", "model.codec.resblock_kernel_sizes=(3,)",  # smaller: faster compiles
        "stage.disc_width_divisor=16", "stage.disc_periods=(2, 3)",
        'stage.trainable=["^codec/(?!encoder/conv_pre/)", "^codec_batch_stats/", "^mpd/", "^msd/", '
        '"^msd_batch_stats/"]'])


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec_stage")
    # Two clips shorter than the 4800-sample crop: every batch is the same (whole clips, zero-padded).
    names = write_clips(root, [0.15, 0.18])
    write_manifest(root / "train.jsonl", [{"audio": n} for n in names])
    cfg = _config(root / "train.jsonl")
    stage = build_stage(cfg)
    initial = jax.device_get(stage.load_params(jax.random.key(cfg.seed)))
    straight = trainer.train(cfg, root / "straight", progress=False)
    first = trainer.train(cfg, root / "resumed", max_steps=N, progress=False)
    resumed = trainer.train(cfg, root / "resumed", progress=False)
    return {"root": root, "initial": initial, "straight": straight, "first": first, "resumed": resumed}


def test_resume_is_exact_for_both_optimizers_and_running_statistics(runs):
    straight, first, resumed = runs["straight"], runs["first"], runs["resumed"]
    assert first["step"] == N and resumed["step"] == straight["step"] == 2 * N
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["trainable"]),
                 jax.device_get(straight["trainable"]))
    assert set(straight["opt_state"]) == {"generator", "discriminator"}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["opt_state"]),
                 jax.device_get(straight["opt_state"]))
    assert _metrics(runs["root"] / "resumed") == _metrics(runs["root"] / "straight")


def test_frozen_leaves_bitwise_and_optimizer_state_holds_only_trainable_params(runs):
    initial, out = runs["initial"], runs["straight"]
    frozen = flatten(jax.device_get(out["frozen"]))
    assert set(frozen) == {k for k in flatten(initial) if k.startswith("codec/encoder/conv_pre/")}
    for path, value in frozen.items():
        np.testing.assert_array_equal(value, flatten(initial)[path])
    trainable = flatten(jax.device_get(out["trainable"]))
    # Running statistics moved (they are updated by the forward passes; 1-element unit vectors cannot)...
    for path in [p for p in trainable if "_batch_stats/" in p and trainable[p].size > 1]:
        assert not np.array_equal(trainable[path], flatten(initial)[path]), path
    # ...but Adam holds moments for the trained params only: no statistics, nothing frozen.
    adam_g = out["opt_state"]["generator"][0]
    adam_d = out["opt_state"]["discriminator"][0]
    params = {p for p in trainable if not p.startswith(("codec_batch_stats/", "msd_batch_stats/"))}
    assert set(flatten(adam_g.mu)) == {p for p in params if p.startswith("codec/")}
    assert set(flatten(adam_d.nu)) == {p for p in params if p.startswith(("mpd/", "msd/"))}


def test_generator_and_discriminator_losses_decrease_on_a_fixed_batch(runs):
    m = _metrics(runs["root"] / "straight")
    assert [r["step"] for r in m] == list(range(1, 2 * N + 1))
    for key in ("mel", "loss", "disc_loss"):
        assert m[-1][key] < m[0][key], (key, [r[key] for r in m])
    assert all(np.isfinite(r[k]) for r in m for k in ("adv", "fm", "vq", "global", "grad_norm"))


def test_prepare_codec_tokens_from_the_trained_run(runs, tmp_path):
    codec = load_speech_codec(runs["root"] / "straight")
    assert (codec.sample_rate, codec.token_rate, codec.vocab_size) == (24000, 40.0, 1024)
    # The run froze conv_pre, so its checkpoint lacks it: rebuilt from the run's seed, bitwise.
    frozen = jax.device_get(runs["straight"]["frozen"])["codec"]["encoder"]["conv_pre"]
    np.testing.assert_array_equal(codec.variables["params"]["encoder"]["conv_pre"]["kernel"],
                                  fold_weight_norm(frozen)["kernel"])
    durations = [0.37, 0.37]  # one length: one encode and one decode compilation
    names = write_clips(tmp_path, durations, seed=1)
    write_clips(tmp_path / "short", [0.01])
    records = [{"audio": n, "text": f"clip {i}"} for i, n in enumerate(names)]
    records += [{"audio": "short/clip0.wav", "text": "too short"}, {"audio": "missing.wav", "text": "gone"}]
    write_manifest(tmp_path / "in.jsonl", records)
    out, problems = prepare_codec_tokens(tmp_path / "in.jsonl", tmp_path / "sub" / "out.jsonl", codec, progress=False)
    assert len(problems) == 2 and "clip0.wav: shorter than one codec token" in problems[0]
    assert "missing.wav" in problems[1]
    written = [json.loads(line) for line in (tmp_path / "sub" / "out.jsonl").read_text().splitlines()]
    assert written == out and [r["text"] for r in out] == ["clip 0", "clip 1"]
    assert out[0]["audio"] == "../clip0.wav"  # relative to the new manifest's folder
    for record, seconds in zip(out, durations):
        tokens = np.asarray(record[TOKENS_FIELD])
        assert len(tokens) == int(seconds * 24000) // 600 == int(seconds * 40)
        assert tokens.min() >= 0 and tokens.max() < 1024
        wav = codec.decode(tokens)
        assert wav.shape == (len(tokens) * 600,) and np.all(np.isfinite(wav))
        np.testing.assert_array_equal(codec.encode(wav).shape, tokens.shape)
    with pytest.raises(ManifestError, match="short/clip0.wav: shorter than one codec token"):
        prepare_codec_tokens(tmp_path / "in.jsonl", tmp_path / "strict.jsonl", codec, policy="strict",
                             progress=False)


def test_prepare_codec_cli_and_one_line_errors(runs, tmp_path, capsys):
    names = write_clips(tmp_path, [0.37])
    write_manifest(tmp_path / "in.jsonl", [{"audio": names[0], "text": "x"}])
    args = ["prepare-codec", "--manifest", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl")]
    assert main(args + ["--codec", str(runs["root"] / "straight")]) == 0
    assert "1 utterances, 14 codec tokens (40 per second); 0 skipped" in capsys.readouterr().out
    assert main(args + ["--codec", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "neither a codec training run" in err and err.count("\n") == 1
    shutil.copytree(runs["root"] / "straight", tmp_path / "copy")
    for meta in (tmp_path / "copy" / "checkpoints").glob("*/meta/metadata"):
        data = json.loads(meta.read_text())
        data["config"]["stage"]["name"] = "speech_decoder"
        meta.write_text(json.dumps(data))
    with pytest.raises(LoadError, match="not a codec training run"):
        load_speech_codec(tmp_path / "copy")
