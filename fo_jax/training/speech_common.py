"""What the speech-in stages share: the frozen LLM and its tokenizer, params carried over from an
earlier run (trained leaves + CMVN statistics), training-sequence layouts and the losses read at
gathered positions of the LLM's output.

A ``Layout`` is one training sequence spelled position by position, in the order the streaming
inference feeds the LLM (``fo_jax.inference.session``): where each input embedding comes from
(text id, prompt, task embedding or speech frame, ``AudioLLM.assemble``), its rotary position and
which later positions still see it, plus the LLM targets and state labels read from it. A turn that
inference drops from its KV cache (speech not addressed to the assistant) stays in the sequence,
seen only by itself; positions after it continue as if it had never been fed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fo_jax.audio.cmvn import cmvn_from_stats
from fo_jax.audio.fbank import CHUNK_FRAMES
from fo_jax.config import model_config
from fo_jax.conversion.hf_qwen2 import load_hf_config, load_hf_qwen2
from fo_jax.errors import ConfigError, LoadError
from fo_jax.models.audio_llm import (AudioLLM, SOURCE_AUDIO, SOURCE_PROMPT, SOURCE_TASK, SOURCE_TEXT, init_params,
                                     state_log_probs)
from fo_jax.models.configs import LLMConfig, ModelConfig
from fo_jax.models.qwen2 import stack_layers
from fo_jax.text.tokenizer import load_tokenizer
from fo_jax.training.checkpoint import load_lineage
from fo_jax.training.freeze import flatten, unflatten
from fo_jax.training.lm import fit_vocab


# --- the frozen LLM -----------------------------------------------------------------------------

@dataclasses.dataclass
class LLMSource:
    """Where a stage's frozen LLM comes from: a HF Qwen2 directory (weights + tokenizer) or, for
    tests, a random model sized by the run config around a tokenizer. ``tokenizer`` is None only
    when neither is given (``--compile-only`` needs shapes alone)."""

    config: LLMConfig
    path: str | None
    tokenizer: Any | None

    @classmethod
    def from_stage(cls, stage: Any, llm: LLMConfig) -> "LLMSource":
        """From ``stage.llm_path`` or ``stage.tokenizer``. The run config keeps the say on dtypes,
        remat and layer scanning; a HF directory sets the architecture."""
        if stage.get("llm_path"):
            hf = load_hf_config(stage.llm_path, dtype=llm.dtype, param_dtype=llm.param_dtype, remat=llm.remat,
                                scan_layers=llm.scan_layers)
            return cls(hf, str(stage.llm_path), load_tokenizer(stage.llm_path))
        if stage.get("tokenizer"):
            tokenizer = load_tokenizer(stage.tokenizer)
            return cls(fit_vocab(llm, tokenizer), None, tokenizer)
        return cls(llm, None, None)

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ConfigError("stage.llm_path (a HF Qwen2 directory with its tokenizer) is required "
                              "(tests: stage.tokenizer=DIR and a random LLM)")
        return self.tokenizer

    def params(self) -> dict | None:
        """The HF weights as a numpy tree (param dtype and layer layout of the run config), or None
        for a random LLM."""
        if self.path is None:
            return None
        params = load_hf_qwen2(self.path, dtype=self.config.dtype, param_dtype=self.config.param_dtype)[1]
        return stack_layers(params, self.config.num_layers) if self.config.scan_layers else params


def speech_model(cfg: Any) -> tuple[LLMSource, ModelConfig]:
    """A speech-in stage's LLM source and model config (the LLM's architecture from ``stage.llm_path``
    when given). The data's 160 ms chunks must be the encoder's streaming chunks."""
    model = model_config(cfg)
    llm = LLMSource.from_stage(cfg.stage, model.llm)
    model = dataclasses.replace(model, llm=llm.config)
    if 4 * model.encoder.chunk_size != CHUNK_FRAMES:
        raise ConfigError(f"model.encoder.chunk_size={model.encoder.chunk_size}: speech is framed in "
                          f"{CHUNK_FRAMES}-frame chunks, i.e. chunk_size {CHUNK_FRAMES // 4}")
    return llm, model


def init_speech_llm(model: ModelConfig, rng: jax.Array, with_llm: bool) -> dict:
    """Random AudioLLM params (host arrays); ``with_llm=False`` leaves the LLM out without ever
    computing it (a loaded 7B replaces it)."""

    def init(r):
        params = nn.unbox(init_params(model, r))
        return params if with_llm else {k: v for k, v in params.items() if k != "llm"}

    return jax.device_get(jax.jit(init)(rng))


# --- params carried over from an earlier run ----------------------------------------------------

def start_params(llm: LLMSource, model: ModelConfig, rng: jax.Array, run: str | None,
                 parts: dict[str, str | None], what: str) -> tuple[dict, dict | None]:
    """A speech-in stage's starting params and the CMVN sums they go with.

    Random AudioLLM params, the LLM from its source, and ``parts`` (name -> regex of leaves no run
    holds, e.g. the CMVN ones) from the earlier ``run`` and the runs it started from
    (``load_lineage``; a workdir, or None: no CMVN sums either, the stage estimates them).
    """
    trained, meta = load_lineage(run) if run is not None else (None, None)  # a bad run fails first
    if meta is not None:
        check_same_model(model, meta["config"].get("model", {}), [p for p in parts if p in ("encoder", "adapter")],
                         what)
    params = init_speech_llm(model, rng, with_llm=llm.path is None)
    if llm.path is not None:
        params["llm"] = llm.params()
    if trained is None:
        return params, None
    if "start_run_missing" in meta:
        what += f" (started from {meta['start_run_missing']}, which is gone)"
    for part, keep in parts.items():
        if part not in trained:
            raise ConfigError(f"{what}: that run trained no {part}")
        params[part] = graft(params[part], trained[part], what, keep)
    return params, run_cmvn_stats(meta, run)


def cmvn_params(stats: dict) -> dict:
    """Encoder CMVN leaves from global CMVN sums (``fo_jax.audio.cmvn`` JSON format)."""
    cmvn = cmvn_from_stats(stats["mean_stat"], stats["var_stat"], float(stats["frame_num"]), "run meta")
    return {"cmvn_mean": jnp.asarray(cmvn.mean), "cmvn_istd": jnp.asarray(cmvn.istd)}


def run_cmvn_stats(meta: dict, workdir: str | os.PathLike) -> dict:
    """The CMVN sums an earlier speech run trained with (its meta carries them; they are frozen,
    so not in its checkpoint)."""
    if "cmvn_stats" not in meta:
        raise LoadError(f"{workdir}: the run's checkpoint holds no CMVN statistics (made by an older "
                        "fo_jax? rerun that stage)")
    return meta["cmvn_stats"]


def graft(ours: dict, trained: dict, what: str, keep: str | None = None) -> dict:
    """``ours`` with every leaf replaced by the trained one at the same path.

    Every leaf of ``ours`` must come from ``trained`` (same shape), except paths matching ``keep``
    (e.g. the frozen CMVN leaves that a checkpoint does not hold); a stray trained leaf is an error too.
    """
    mine, theirs = flatten(ours), flatten(trained)
    for path, value in mine.items():
        if path in theirs:
            if tuple(np.shape(theirs[path])) != tuple(np.shape(value)):
                raise ConfigError(f"{what}: param {path!r} has shape {tuple(np.shape(theirs[path]))}, "
                                  f"this config needs {tuple(np.shape(value))}")
        elif keep is None or not re.search(keep, path):
            raise ConfigError(f"{what}: the run has no param {path!r} (another model config?)")
    stray = sorted(set(theirs) - set(mine))
    if stray:
        raise ConfigError(f"{what}: the run has param {stray[0]!r}, which this config does not")
    return unflatten({p: np.asarray(theirs[p], np.asarray(v).dtype) if p in theirs else v for p, v in mine.items()})


# Config fields that only affect training, not what a trained encoder / adapter computes.
_TRAINING_ONLY = {"dropout", "positional_dropout", "attention_dropout", "dynamic_chunks", "remat", "dtype",
                  "ctc_vocab_size"}


def check_same_model(ours: ModelConfig, theirs: dict, parts: Sequence[str], what: str) -> None:
    """Raises when an earlier run's model config (``meta['config']['model']``) differs in a part
    that decides what its trained params compute (chunking, widths...)."""
    for part in parts:
        mine = dataclasses.asdict(getattr(ours, part))
        for key, value in theirs.get(part, {}).items():
            if key in _TRAINING_ONLY or key not in mine:
                continue
            if (tuple(value) if isinstance(value, list) else value) != mine[key]:
                raise ConfigError(f"{what}: model.{part}.{key} was {value!r} there, {mine[key]!r} here")


# --- sequences ----------------------------------------------------------------------------------

class Layout:
    """One training sequence, built in feed order (see the module doc)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.source: list[int] = []
        self.index: list[int] = []
        self.positions: list[int] = []
        self.dropped: list[tuple[int, int]] = []  # [start, end) spans later positions do not see
        self.targets: list[tuple[int, int]] = []  # (position predicting it, token id)
        self.states: list[tuple[int, int]] = []  # (position, state label)
        self._position = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def _add(self, token: int, source: int, index: int) -> None:
        self.tokens.append(int(token))
        self.source.append(source)
        self.index.append(int(index))
        self.positions.append(self._position)
        self._position += 1

    def text(self, ids: Sequence[int]) -> None:
        for i in ids:
            self._add(i, SOURCE_TEXT, 0)

    def prompts(self, n: int) -> None:
        for i in range(n):
            self._add(0, SOURCE_PROMPT, i)

    def task(self, i: int) -> None:
        self._add(0, SOURCE_TASK, i)

    def audio(self, start: int, n: int) -> None:
        """n speech frames: rows start.. of the sequence's speech embeddings."""
        for a in range(n):
            self._add(0, SOURCE_AUDIO, start + a)

    def state(self, label: int) -> None:
        """The state head's label at the last position so far (a chunk's last frame)."""
        self.states.append((len(self) - 1, label))

    def predict(self, ids: Sequence[int], end_id: int) -> None:
        """``ids`` then ``end_id`` as targets, each predicted by the position before it. The ids are
        fed; the end token is not (inference stops on it; a next turn's prefix starts with it)."""
        for i in ids:
            self.targets.append((len(self) - 1, int(i)))
            self.text([i])
        self.targets.append((len(self) - 1, int(end_id)))

    def drop_since(self, start: int) -> None:
        """Positions ``start..`` are seen by nothing after them, and later positions continue from
        ``start``'s position: inference took them out of its KV cache."""
        self.dropped.append((start, len(self)))
        self._position = self.positions[start]

    def arrays(self, seq_len: int, max_targets: int, max_states: int = 0) -> dict[str, np.ndarray]:
        """Padded arrays of one row (see ``batch_spec`` for names and shapes)."""
        n = len(self)
        if n > seq_len or len(self.targets) > max_targets or len(self.states) > max_states:
            raise ValueError(f"layout of {n} positions / {len(self.targets)} targets / {len(self.states)} "
                             f"states exceeds {seq_len} / {max_targets} / {max_states}")
        until = np.full(seq_len, seq_len, np.int32)
        for start, end in self.dropped:
            until[start:end] = end
        out = {"tokens": _pad(self.tokens, seq_len), "source": _pad(self.source, seq_len),
               "index": _pad(self.index, seq_len), "positions": _pad(self.positions, seq_len),
               "until": until, "lengths": np.int32(n)}
        out.update(_pairs(self.targets, max_targets, "target_pos", "target_ids", "target_w"))
        if max_states:
            out.update(_pairs(self.states, max_states, "state_pos", "state_label", "state_w"))
        return out


def _pad(values: Sequence[int], n: int) -> np.ndarray:
    out = np.zeros(n, np.int32)
    out[:len(values)] = values
    return out


def _pairs(pairs: Sequence[tuple[int, int]], n: int, pos: str, value: str, weight: str) -> dict[str, np.ndarray]:
    w = np.zeros(n, np.float32)
    w[:len(pairs)] = 1.0
    return {pos: _pad([p for p, _ in pairs], n), value: _pad([v for _, v in pairs], n), weight: w}


def layout_spec(batch: int, seq_len: int, max_targets: int, max_states: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a batch of ``Layout.arrays`` rows (abstract example batches)."""
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    spec = {k: jax.ShapeDtypeStruct((batch, seq_len), i32)
            for k in ("tokens", "source", "index", "positions", "until")}
    spec["lengths"] = jax.ShapeDtypeStruct((batch,), i32)
    for names, n in ((("target_pos", "target_ids", "target_w"), max_targets),
                     (("state_pos", "state_label", "state_w"), max_states)):
        if n:
            spec.update({names[0]: jax.ShapeDtypeStruct((batch, n), i32),
                         names[1]: jax.ShapeDtypeStruct((batch, n), i32),
                         names[2]: jax.ShapeDtypeStruct((batch, n), f32)})
    return spec


def visibility_mask(lengths_b: jax.Array, until_bt: jax.Array) -> jax.Array:
    """(B, T, T) bool attention mask: causal, keys before the row's length, and key s visible to
    query t only while t < until[s] (dropped turns)."""
    t = until_bt.shape[1]
    steps = jnp.arange(t)
    causal = steps[:, None] >= steps[None, :]
    valid = steps[None, :] < lengths_b[:, None]
    return causal[None] & valid[:, None, :] & (steps[None, :, None] < until_bt[:, None, :])


def sequence_forward(params: dict, model: ModelConfig, batch: dict, audio_bad: jax.Array) -> dict[str, jax.Array]:
    """A batch of ``Layout`` rows through the AudioLLM: {'hidden' (B, T, D), 'state_logits' (B, T, S)}.

    ``audio_bad``: (B, A, E) each row's speech embeddings, indexed by the layout's audio positions.
    """
    mask = visibility_mask(batch["lengths"], batch["until"])
    return AudioLLM(model).apply({"params": params}, batch["tokens"], batch["source"], batch["index"],
                                 batch["lengths"], audio_bad, False, batch["positions"], mask)


# --- losses at gathered positions ---------------------------------------------------------------

def _gather(x_btd: jax.Array, pos_bm: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_btd, pos_bm[..., None], axis=1)


def target_cross_entropy(params: dict, model: ModelConfig, hidden_btd: jax.Array, pos_bm: jax.Array,
                         ids_bm: jax.Array, w_bm: jax.Array) -> jax.Array:
    """Mean LLM cross-entropy over the targets (weights ``w_bm``).

    Logits are formed at the M target positions only: (B, M, V), not (B, T, V) (the 7B's vocabulary
    is 152k wide).
    """
    logits = AudioLLM(model).apply({"params": params}, _gather(hidden_btd, pos_bm), method=AudioLLM.logits)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids_bm)
    return jnp.sum(nll * w_bm) / jnp.maximum(jnp.sum(w_bm), 1.0)


def state_cross_entropy(state_logits_bts: jax.Array, pos_bk: jax.Array, labels_bk: jax.Array,
                        w_bk: jax.Array, balanced: bool = False) -> tuple[jax.Array, jax.Array]:
    """(CE, accuracy) of the state head at the labelled positions, over the classes inference
    reads (``state_log_probs``: softmax of the first 3 logits).

    The CE is the mean over labelled positions, or with ``balanced`` the mean over the classes
    present in the batch of each class's mean: a turn has one decisive chunk among many
    'keep listening' ones, and the plain mean is then minimised by never deciding.
    """
    logp = state_log_probs(_gather(state_logits_bts, pos_bk))
    nll = -jnp.take_along_axis(logp, labels_bk[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(w_bk), 1.0)
    hits = (jnp.argmax(logp, axis=-1) == labels_bk).astype(jnp.float32)
    weights = w_bk / count
    if balanced:
        onehot = jax.nn.one_hot(labels_bk, logp.shape[-1]) * w_bk[..., None]  # (B, K, classes)
        per_class = jnp.sum(onehot, axis=(0, 1))
        share = jnp.where(per_class > 0, 1.0 / jnp.maximum(per_class, 1.0), 0.0) / jnp.maximum(
            jnp.sum(per_class > 0), 1)
        weights = jnp.sum(onehot * share, axis=-1)
    return jnp.sum(nll * weights), jnp.sum(hits * w_bk) / count
