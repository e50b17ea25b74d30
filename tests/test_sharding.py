"""Sharded execution on 8 fake CPU devices equals single-device execution.

XLA_FLAGS must be set before jax is imported, so the checks run in their own process.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from fo_jax import sharding
    from fo_jax.inference import llm
    from fo_jax.models.qwen2 import Qwen2, init_params
    from tests.conftest import TINY_LLM as cfg

    assert jax.device_count() == 8
    mesh = sharding.make_mesh((2, 2, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    init = functools.partial(init_params, cfg)
    params, shardings = sharding.init_sharded(init, jax.random.key(0), mesh)
    q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("tensor", None, "fsdp"), q.sharding.spec  # (heads, head_dim, embed)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 32)
    assert params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16)).astype(np.int32)
    lengths = np.array([16, 9, 4, 12], np.int32)
    fwd = jax.jit(lambda p, t, n: Qwen2(cfg).apply({"params": p}, t, n, method=Qwen2.forward))
    batch = sharding.batch_sharding(mesh, 2)
    sharded = fwd(params, jax.device_put(tokens, batch), jax.device_put(lengths, sharding.batch_sharding(mesh, 1)))
    host = jax.device_get(params)
    single = fwd(jax.device_put(host, jax.devices()[0]), tokens, lengths)
    diff = float(jnp.abs(jax.device_get(sharded) - jax.device_get(single)).max())
    assert diff <= 1e-5, diff

    # Host params placed on the mesh by their logical names (the HF-loading path) agree too.
    placed = sharding.shard_params(host, jax.eval_shape(init, jax.random.key(0)), mesh)
    assert placed["layers_1"]["mlp"]["down_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")  # (embed, mlp)
    diff2 = float(jnp.abs(jax.device_get(fwd(placed, tokens, lengths)) - jax.device_get(single)).max())
    assert diff2 <= 1e-5, diff2

    # Sharded greedy generation gives the same tokens as single-device generation.
    assert llm.generate(placed, cfg, [[5, 6, 7], [8, 9]], 8) == llm.generate(
        jax.device_put(host, jax.devices()[0]), cfg, [[5, 6, 7], [8, 9]], 8)
    print("SHARDING_OK", diff, diff2)
""")


def test_sharded_forward_on_8_fake_devices_equals_single_device():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDING_OK" in result.stdout
