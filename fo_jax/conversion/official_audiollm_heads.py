"""The AudioLLM's own tensors in the official ``audiollm/final.pt``: prompts, task table, state head.

Official names (``models/audioLLM.py``): ``prompt_embeddings`` (nn.Embedding(prompt_num, D)),
``task_embeddings`` (nn.Embedding(task_num, D)), ``predictor_head`` (nn.Linear(D, num_states)).
The encoder / adapter tensors of the same file are converted by ``official_audiollm``;
``convert_audiollm`` puts all parts together into the AudioLLM param tree.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from fo_jax.conversion import official_audiollm as oa
from fo_jax.errors import LoadError
from fo_jax.models.configs import ModelConfig, to_dtype

_SAME: Callable[[np.ndarray], np.ndarray] = lambda w: w  # torch Linear (out, in) is our layout too

# (official name, our param path, official -> ours)
HEADS_TABLE: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
    ("prompt_embeddings.weight", "prompt_embeddings/embedding", _SAME),
    ("task_embeddings.weight", "task_embeddings/embedding", _SAME),
    ("predictor_head.weight", "state_head/kernel", _SAME),
    ("predictor_head.bias", "state_head/bias", _SAME),
]
# Dropped in stage 3 and unused at inference: may be absent from a checkpoint (then zeros).
OPTIONAL_KEYS = ("task_embeddings.weight",)


def expected_head_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Official shapes of the head tensors for this config."""
    d, a = cfg.llm.hidden_size, cfg.adapter
    return {"prompt_embeddings.weight": (a.prompt_num, d), "task_embeddings.weight": (a.task_num, d),
            "predictor_head.weight": (a.num_states, d), "predictor_head.bias": (a.num_states,)}


def convert_heads(state_dict: Mapping[str, Any], cfg: ModelConfig,
                  source: str = "final.pt") -> tuple[dict, set[str]]:
    """Official head tensors -> our param subtrees, in the LLM param dtype.

    Args:
      state_dict: official name -> array (numpy or anything ``np.asarray`` takes); other keys are
        left to the other converters.
      cfg: the model config (LLM width, prompt_num, task_num, num_states).
      source: file name for error messages.
    Returns:
      ({'prompt_embeddings': ..., 'task_embeddings': ..., 'state_head': ...}, the keys used).
    Raises:
      LoadError: naming ``source`` and the missing or wrong-shape key.
    """
    shapes = expected_head_shapes(cfg)
    dtype = to_dtype(cfg.llm.param_dtype)
    params: dict = {}
    used: set[str] = set()
    for key, path, to_ours in HEADS_TABLE:
        if key not in state_dict:
            if key not in OPTIONAL_KEYS:
                raise LoadError(f"{source}: missing tensor {key!r}")
            array = np.zeros(shapes[key], np.float32)
        else:
            array = np.asarray(state_dict[key])
            used.add(key)
        if tuple(array.shape) != shapes[key]:
            raise LoadError(f"{source}: tensor {key!r} has shape {tuple(array.shape)}, "
                            f"the config implies {shapes[key]}")
        module, leaf = path.split("/")
        params.setdefault(module, {})[leaf] = np.asarray(to_ours(array), dtype)
    return params, used


def convert_audiollm(state_dict: Mapping[str, Any], cfg: ModelConfig, llm_params: dict | None = None,
                     cmvn: tuple[np.ndarray, np.ndarray] | None = None, source: str = "final.pt") -> dict:
    """A whole official AudioLLM state dict -> our AudioLLM param tree.

    Encoder / adapter (and the CTC head, checked then dropped) go through
    ``official_audiollm``; the LLM comes from ``llm_decoder.*`` keys when the file has them, else
    from ``llm_params`` (the Qwen2 checkpoint, e.g. ``hf_qwen2.load_hf_qwen2``).

    Raises:
      LoadError: naming ``source`` and the key, for missing / wrong-shape / leftover tensors, or
        when neither the file nor ``llm_params`` provides the LLM.
    """
    encoder, adapter, rest = oa.convert_encoder_adapter(state_dict, cfg.encoder, cfg.adapter, source, cmvn)
    _, rest = oa.convert_ctc(rest, cfg.encoder, source)
    llm, rest = oa.convert_llm(rest, cfg.llm, source)
    if llm is None:
        if llm_params is None:
            raise LoadError(f"{source}: no 'llm_decoder.*' tensors; pass the Qwen2 params")
        llm = llm_params
    heads, used = convert_heads(rest, cfg, source)
    leftover = sorted(k for k in rest if k not in used)
    if leftover:
        raise LoadError(f"{source}: unexpected tensor {leftover[0]!r}"
                        + (f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else ""))
    params = {"encoder": encoder, "adapter": adapter["params"], "llm": llm, **heads}
    if "batch_stats" in adapter:
        params["adapter_batch_stats"] = adapter["batch_stats"]
    return params
