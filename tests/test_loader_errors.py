"""Bad loader input ends in one line naming the file and the key, not a deep traceback."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from fo_jax.conversion.hf_qwen2 import load_hf_qwen2, save_hf_qwen2
from fo_jax.conversion.safetensors_io import read_safetensors, write_safetensors
from fo_jax.errors import LoadError
from fo_jax.models.qwen2 import init_params
from tests.conftest import TINY_LLM


@pytest.fixture()
def model_dir(tmp_path):
    params = jax.device_get(nn.unbox(init_params(TINY_LLM, jax.random.key(0))))
    save_hf_qwen2(tmp_path, TINY_LLM, params)
    return tmp_path


def _error(path) -> str:
    with pytest.raises(LoadError) as info:
        load_hf_qwen2(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_round_trip_loads(model_dir):
    cfg, params = load_hf_qwen2(model_dir)
    assert cfg.num_layers == 2 and params["layers_1"]["self_attn"]["k_proj"]["kernel"].shape == (2, 16, 64)


def test_missing_directory(tmp_path):
    assert str(tmp_path / "nope") in _error(tmp_path / "nope")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    assert _error(model_dir) == f"{model_dir / 'config.json'}: not found"


def test_config_of_another_architecture(model_dir):
    hf = json.loads((model_dir / "config.json").read_text())
    hf["model_type"] = "llama"
    (model_dir / "config.json").write_text(json.dumps(hf))
    msg = _error(model_dir)
    assert "config.json" in msg and "model_type" in msg and "'llama'" in msg


def test_corrupt_config_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _error(model_dir)


def test_missing_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    assert "no model.safetensors" in _error(model_dir)


def _rewrite(model_dir, edit):
    tensors = {k: np.array(v) for k, v in read_safetensors(model_dir / "model.safetensors").items()}
    edit(tensors)
    write_safetensors(model_dir / "model.safetensors", tensors)


def test_shape_mismatch_names_file_and_key(model_dir):
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite(model_dir, lambda t: t.__setitem__(key, np.zeros((100, 64), np.float32)))
    msg = _error(model_dir)
    assert "model.safetensors" in msg and key in msg and "(100, 64)" in msg and "(128, 64)" in msg


def test_missing_key_names_it(model_dir):
    _rewrite(model_dir, lambda t: t.pop("model.layers.0.self_attn.v_proj.bias"))
    msg = _error(model_dir)
    assert str(model_dir) in msg and "missing tensor 'model.layers.0.self_attn.v_proj.bias'" in msg


def test_unexpected_key_names_it(model_dir):
    _rewrite(model_dir, lambda t: t.__setitem__("model.layers.9.extra.weight", np.zeros(3, np.float32)))
    msg = _error(model_dir)
    assert "model.safetensors" in msg and "unexpected tensor 'model.layers.9.extra.weight'" in msg


def test_truncated_safetensors(model_dir):
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    msg = _error(model_dir)
    assert "model.safetensors" in msg and "truncated" in msg


def test_garbage_safetensors(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x00\x01garbage")
    assert "not a readable safetensors file" in _error(model_dir)


def test_sharded_index_with_missing_shard(model_dir):
    params = jax.device_get(nn.unbox(init_params(TINY_LLM, jax.random.key(0))))
    save_hf_qwen2(model_dir / "sharded", TINY_LLM, params, max_shard_bytes=50_000)
    shard = sorted((model_dir / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert f"{shard}: listed in the index but missing" == _error(model_dir / "sharded")


def test_cli_reports_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fo_jax.cli.main", "generate", "--llm_path",
                             str(tmp_path / "missing"), "--prompt", "hi"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert str(tmp_path / "missing") in result.stderr
