"""Freezing, the generic train step and checkpoint resume, on the tiny Qwen2 LM."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fo_jax.errors import ConfigError
from fo_jax.models.qwen2 import Qwen2, init_params
from fo_jax.training import lm
from fo_jax.training.checkpoint import TrainCheckpointer
from fo_jax.training.freeze import fingerprint, flatten, merge, split_trainable
from fo_jax.training.optim import OptimizerConfig, make_optimizer
from fo_jax.training.step import make_train_step
from tests.conftest import TINY_LLM

ROOT = Path(__file__).resolve().parent.parent


def _loss(params, batch, rng):
    tokens, mask = batch
    return lm.next_token_loss(params, TINY_LLM, tokens, mask), {}


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, TINY_LLM.vocab_size, (4, 16)), jnp.int32), jnp.ones((4, 16), jnp.float32)


@pytest.fixture(scope="module")
def params():
    return nn.unbox(init_params(TINY_LLM, jax.random.key(0)))


def test_embedding_noise_perturbs_only_the_inputs_and_trains(params):
    tokens, mask = _batch()
    clean = lm.next_token_loss(params, TINY_LLM, tokens, mask)
    # No noise: the model's own full-sequence forward, exactly; with noise: another loss per rng, the
    # same for the same rng.
    logits = Qwen2(TINY_LLM).apply({"params": params}, tokens, method=Qwen2.forward)[:, :-1]
    np.testing.assert_allclose(clean, optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(),
                               rtol=1e-6)
    assert lm.next_token_loss(params, TINY_LLM, tokens, mask, 0.0, jax.random.key(1)) == clean
    a, b, a2 = (lm.next_token_loss(params, TINY_LLM, tokens, mask, 0.5, jax.random.key(k)) for k in (1, 2, 1))
    assert a == a2 and a != b and a != clean
    # Tiny noise barely moves the loss: the noise is scaled to the embeddings, not absolute.
    tiny = lm.next_token_loss(params, TINY_LLM, tokens, mask, 1e-4, jax.random.key(1))
    assert abs(float(tiny) - float(clean)) < 1e-3 * float(clean)
    grads = jax.grad(lm.next_token_loss)(params, TINY_LLM, tokens, mask, 0.5, jax.random.key(1))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["embed_tokens"]["embedding"]).sum()) > 0


def test_split_and_merge(params):
    trainable, frozen = split_trainable(params, [r"^layers_1/", r"^norm/"])
    assert set(trainable) == {"layers_1", "norm"} and "layers_1" not in frozen
    assert fingerprint(merge(trainable, frozen)) == fingerprint(params)
    with pytest.raises(ConfigError, match="matches no param"):
        split_trainable(params, [r"^encoder/"])


def test_frozen_leaves_stay_bitwise_identical_and_out_of_the_optimizer(params):
    # Copies: the step donates the trainable arrays, which would delete the fixture's buffers.
    trainable, frozen = split_trainable(jax.tree.map(jnp.array, params), [r"^layers_1/", r"^lm_head/"])
    before = fingerprint(frozen)
    frozen_copy = jax.tree.map(np.array, frozen)
    optimizer = make_optimizer(OptimizerConfig(lr=1e-2, schedule="constant", warmup_steps=1))
    opt_state = optimizer.init(trainable)
    n_trainable = len(flatten(trainable))
    # Adam keeps mu and nu per trainable leaf (plus scalar counters): nothing for frozen leaves.
    array_leaves = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
    assert len(array_leaves) == 2 * n_trainable
    step = make_train_step(_loss, optimizer)
    batch = _batch()
    losses = []
    for i in range(25):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert fingerprint(frozen) == before
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_copy)


def test_gradients_flow_through_frozen_layers(params):
    # Only the input embedding trains: its gradient must pass through both frozen blocks.
    trainable, frozen = split_trainable(params, [r"^embed_tokens/"])
    grads = jax.grad(lambda t: _loss(merge(t, jax.tree.map(jax.lax.stop_gradient, frozen)), _batch(), None)[0])(
        trainable)
    g = np.asarray(grads["embed_tokens"]["embedding"])
    tokens = np.asarray(_batch()[0])
    assert np.abs(g[np.unique(tokens[:, :-1])]).sum(axis=1).min() > 0  # every input token row gets a gradient
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)


def _run(trainable, opt_state, frozen, step_fn, start, stop):
    for i in range(start, stop):
        trainable, opt_state, _ = step_fn(trainable, opt_state, frozen, _batch(i), jax.random.key(i))
    return trainable, opt_state


def test_resume_is_exact(tmp_path, params):
    optimizer = make_optimizer(OptimizerConfig(lr=3e-3, schedule="cosine", warmup_steps=2, total_steps=8))
    step_fn = make_train_step(_loss, optimizer)
    split = lambda: split_trainable(jax.tree.map(jnp.array, params), [r"^layers_0/mlp/", r"^lm_head/"])
    t, f = split()
    straight, _ = _run(t, optimizer.init(t), f, step_fn, 0, 8)

    t, f = split()
    t, o = _run(t, optimizer.init(t), f, step_fn, 0, 4)
    ckpt = TrainCheckpointer(tmp_path, save_every=4)
    assert ckpt.save(4, t, o, jax.random.key(7), {"next_index": 4}, {"frozen": fingerprint(f)})
    ckpt.close()

    resumed = TrainCheckpointer(tmp_path, save_every=4)
    t0, f0 = split()
    step, t, o, rng, data, meta = resumed.restore(t0, optimizer.init(t0))
    assert step == 4 and data == {"next_index": 4} and meta["frozen"] == fingerprint(f0)
    assert np.array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(7)))
    t, _ = _run(t, o, f0, step_fn, 4, 8)
    jax.tree.map(np.testing.assert_array_equal, t, straight)
    resumed.close()


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, jax, numpy as np
    from fo_jax.training.checkpoint import TrainCheckpointer
    ckpt = TrainCheckpointer(sys.argv[1], save_every=1)
    small = {"w": np.ones((4,), np.float32)}
    ckpt.save(1, small, small, jax.random.key(0), {"i": 1}, {"m": 1})
    ckpt.wait()
    big = {"w": np.ones((64, 1024, 1024), np.float32)}  # 256 MiB: still being written when we die
    ckpt.save(2, big, big, jax.random.key(0), {"i": 2}, {"m": 2})
    os._exit(1)
""")


def test_killed_async_save_leaves_last_complete_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    ckpt = TrainCheckpointer(tmp_path)
    assert ckpt.latest_step() == 1
    like = {"w": np.zeros((4,), np.float32)}
    step, t, _, _, data, meta = ckpt.restore(like, like)
    assert step == 1 and data == {"i": 1} and meta == {"m": 1}
    np.testing.assert_array_equal(t["w"], np.ones(4))
    ckpt.close()


def test_lr_scales_scale_each_matching_params_update():
    """``optimizer.lr_scales``: the matching leaves' updates (AdamW step and weight decay) are the
    factor times the unscaled ones; the others are unchanged; the first matching regex wins."""
    params = {"encoder": {"w": jnp.ones((3,)), "b": jnp.ones((2,))}, "adapter": {"w": jnp.ones((4,))}}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size), params)
    base = OptimizerConfig(lr=1e-2, schedule="constant", warmup_steps=1, weight_decay=0.1)
    scaled = OptimizerConfig(**{**base.__dict__, "lr_scales": [["^encoder/w$", 0.5], ["^encoder/", 0.25]]})
    assert scaled.lr_scales == (("^encoder/w$", 0.5), ("^encoder/", 0.25))  # lists become hashable pairs
    hash(scaled)
    updates = {}
    for name, cfg in (("base", base), ("scaled", scaled)):
        opt = make_optimizer(cfg)
        _, state = opt.update(grads, opt.init(params), params)  # step 0: the warm-up's rate is 0
        updates[name], _ = opt.update(grads, state, params)
    np.testing.assert_allclose(updates["scaled"]["encoder"]["w"], 0.5 * updates["base"]["encoder"]["w"], rtol=1e-6)
    np.testing.assert_allclose(updates["scaled"]["encoder"]["b"], 0.25 * updates["base"]["encoder"]["b"], rtol=1e-6)
    np.testing.assert_array_equal(updates["scaled"]["adapter"]["w"], updates["base"]["adapter"]["w"])
    assert np.abs(updates["base"]["encoder"]["w"]).min() > 0
    with pytest.raises(ConfigError, match="optimizer.lr_scales"):
        OptimizerConfig(lr_scales=[["(unclosed", 0.5]])
    with pytest.raises(ConfigError, match="optimizer.lr_scales"):
        OptimizerConfig(lr_scales=["^encoder/"])
