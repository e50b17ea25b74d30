# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 — The Qwen2 LLM: HF checkpoint in, text out, params sharded
#
# Freeze-Omni keeps its text LLM (Qwen2-7B-Instruct) frozen; `fo_jax` reimplements it in Flax
# (`fo_jax.models.qwen2`). This notebook walks through the LLM on its own:
#
# 1. build a **tiny random Qwen2** (the `tiny` run config's dimensions, but the real Qwen2
#    vocabulary) and write it out as a Hugging Face Qwen2 directory;
# 2. load it back with `load_hf_qwen2` + `load_tokenizer`, exactly as a real checkpoint is loaded;
# 3. generate greedily from a ChatML prompt with `generate`;
# 4. place the params on a `('data', 'fsdp', 'tensor')` device mesh and look at the sharding.
#
# It runs on a CPU in under a minute. The weights are random, so the generated text is gibberish:
# the point is the plumbing, which is the same for the real 7B model.

# %% [markdown]
# ## Setup
#
# To show real sharding on a laptop we ask XLA for **4 fake CPU devices**. This has to happen
# before `jax` is imported, so it is the first thing the notebook does. (`JAX_PLATFORMS=cpu` keeps
# the demo on those CPU devices even on a GPU machine; drop both lines to use your accelerators.)

# %%
import os
import re

_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import functools
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from fo_jax.config import load_config, model_config
from fo_jax.conversion.hf_qwen2 import load_hf_qwen2, save_hf_qwen2
from fo_jax.inference.llm import generate
from fo_jax.models.qwen2 import init_params
from fo_jax.sharding import make_mesh, shard_params
from fo_jax.text.tokenizer import QWEN2_SPECIAL_IDS, chatml, load_tokenizer, qwen2_tokenizer

print("jax", jax.__version__, "| devices:", jax.devices())

# %% [markdown]
# ## 1. A tiny random Qwen2, saved as a Hugging Face directory
#
# `load_config('configs/freeze_omni.py:tiny')` is the CPU-sized variant of the Freeze-Omni run
# config; `model_config` turns its `model` section into the frozen dataclasses the modules take.
# We keep its LLM dimensions (2 layers, width 64, 4 query / 2 KV heads) but swap in the real Qwen2
# vocabulary: `qwen2_tokenizer()` builds the official Qwen2 BPE tokenizer offline, and its size
# (151,646 tokens incl. `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) becomes `vocab_size`.
# Generation stops at `<|im_end|>` / `<|endoftext|>`, as for Qwen2-Instruct.

# %%
tok = qwen2_tokenizer()
tiny = model_config(load_config("configs/freeze_omni.py:tiny")).llm
cfg = dataclasses.replace(
    tiny,
    vocab_size=len(tok),
    eos_token_ids=(QWEN2_SPECIAL_IDS["<|im_end|>"], QWEN2_SPECIAL_IDS["<|endoftext|>"]),
)
print(cfg)

# %% [markdown]
# `init_params` returns params *boxed* with logical axis names (used for sharding below);
# `nn.unbox` gives the plain arrays. `save_hf_qwen2` writes `config.json` + `model.safetensors`
# with HF's tensor names and layouts, and `tok.save_pretrained` adds the tokenizer files.
#
# The result has **the same layout as a real `Qwen/Qwen2-7B-Instruct` download**
# (`config.json`, safetensors weights — there sharded with an index file —, `tokenizer.json`,
# `tokenizer_config.json`). To use the real model, point `load_hf_qwen2` / `load_tokenizer` at that
# directory instead (e.g. `load_hf_qwen2(path, dtype="bfloat16")`): nothing else in this notebook
# changes.

# %%
params = nn.unbox(init_params(cfg, jax.random.key(0)))
workdir = tempfile.TemporaryDirectory()
model_dir = Path(workdir.name) / "tiny-qwen2"
save_hf_qwen2(model_dir, cfg, params)
tok.save_pretrained(model_dir)
for f in sorted(model_dir.iterdir()):
    print(f"{f.name:28s} {f.stat().st_size / 1e6:8.2f} MB")

# %% [markdown]
# ## 2. Load it back
#
# `load_hf_qwen2` reads `config.json` into an `LLMConfig` and the safetensors into our param tree
# (numpy arrays, transposed/reshaped from torch's `(out, in)` layout). It checks every tensor's
# name and shape against the config and fails with one line naming the file and the key.

# %%
llm_cfg, llm_params = load_hf_qwen2(model_dir)
llm_tok = load_tokenizer(model_dir)
assert llm_cfg == cfg, (llm_cfg, cfg)
assert all(np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(llm_params), jax.tree.leaves(params), strict=True))
print("round trip OK:", len(jax.tree.leaves(llm_params)), "tensors,",
      sum(x.size for x in jax.tree.leaves(llm_params)), "parameters")
print(jax.tree.map(np.shape, llm_params["layers_0"]))

# %% [markdown]
# ## 3. Greedy generation from a ChatML prompt
#
# Qwen2-Instruct talks ChatML: `<|im_start|>role\n...<|im_end|>\n` turns, then
# `<|im_start|>assistant\n` to ask for a reply. `chatml` renders it (with the default system
# prompt, like the model's own chat template — the two agree). `generate` prefills the prompt into
# a KV cache and decodes token by token with jitted steps; the default sampler is greedy
# (`SamplingConfig(top_k=1)`), and each row stops after its first end token.

# %%
messages = [{"role": "user", "content": "Give me a short introduction to large language models."}]
prompt = chatml(messages)
assert prompt == llm_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
prompt_ids = llm_tok.encode(prompt)
print(prompt)
print("prompt ids:", prompt_ids)

(generated,) = generate(llm_params, llm_cfg, [prompt_ids], max_new_tokens=16)
print("GENERATED_IDS:", generated)
print("GENERATED_TEXT:", repr(llm_tok.decode(generated)))

# %% [markdown]
# ## 4. Sharding the params over a device mesh
#
# `make_mesh` builds a `('data', 'fsdp', 'tensor')` mesh; here the 4 devices form `(1, 2, 2)`.
# Every param carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
# `mlp`, `norm`), and one table, `fo_jax.sharding.LOGICAL_RULES`, maps them to mesh axes:
# `vocab`/`heads`/`kv_heads`/`mlp` → `tensor`, `embed` → `fsdp`, the rest replicated.
#
# Host params (e.g. just loaded from HF) have no names, so `shard_params` takes the *boxed shapes*
# — `jax.eval_shape` of `init_params`, which costs no memory or compute — and `device_put`s each
# array with its `NamedSharding`.

# %%
n = len(jax.devices())
mesh = make_mesh((1, 2, 2) if n == 4 else (-1, 1, 1))
print(mesh)

boxed_shapes = jax.eval_shape(functools.partial(init_params, llm_cfg), jax.random.key(0))
sharded = shard_params(llm_params, boxed_shapes, mesh)

is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
rows = []
for (path, box), arr in zip(jax.tree_util.tree_flatten_with_path(boxed_shapes, is_leaf=is_boxed)[0],
                            jax.tree.leaves(sharded), strict=True):
    name = "/".join(k.key for k in path)
    rows.append((name, str(arr.shape), str(box.names), str(arr.sharding.spec),
                 str(arr.sharding.shard_shape(arr.shape))))
header = ("param", "shape", "logical axes", "PartitionSpec", "per-device shard")
widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
for r in [header] + rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))

# %% [markdown]
# A picture of one 2-D param: the MLP gate projection, stored `(mlp, embed)` like a torch Linear
# weight, is split by rows over `tensor` and by columns over `fsdp`, so each of the 4 devices
# holds one quarter.

# %%
# use_color=False: with matplotlib installed, jax colours the blocks and drops the grid lines.
jax.debug.visualize_array_sharding(sharded["layers_0"]["mlp"]["gate_proj"]["kernel"], use_color=False)

# %% [markdown]
# Jitted code runs on sharded params unchanged (GSPMD inserts the collectives), so the same
# `generate` call works on the mesh. Results agree with the single-device run up to float
# rounding, which can in principle flip a near-tie in the argmax of a random model.

# %%
(generated_sharded,) = generate(sharded, llm_cfg, [prompt_ids], max_new_tokens=16)
print("SHARDED_IDS:", generated_sharded)
print("same as single-device run:", generated_sharded == generated)
