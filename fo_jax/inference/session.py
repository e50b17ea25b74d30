"""Per-user dialogue sessions and their jitted streaming steps (listen, speak).

A ``Session`` holds everything one user's conversation needs between calls (encoder buffers and
positional index, adapter cache, fbank overlap frames, LLM KV cache, dialogue state, last token).
Every field carries the user axis, so many users' sessions stack into one pytree and step together
(``stack_sessions`` / ``take_rows`` / ``put_rows``); the KV cache keeps its layer-first layouts,
so its user axis is axis 1 (``batch_axes``).

Steps have fixed shapes and donate the session, so a stream never recompiles after warm-up:

  prefill_system(params, template, cfg) -> system cache     once; never donated, copied per user
  new_session(system_cache, ...)        -> Session (state SL)
  listen(params, session, fbank_chunk)  -> (session, state probs)      one 160 ms chunk per row
  speak(params, session, rng)           -> (session, token, hidden)    one text token per row
  apply_event(session, event)           -> session                     VAD start/end, interruption

Rows take part in a step only where their dialogue state fits (listen: SL/CL, speak: SS/CS) and
``active_b`` (default all) is set; the other rows come back unchanged. The first chunk of a turn
(state SL) prepends the user header and the learned prompts; the first speak step (SS) feeds the
assistant header. Each step therefore has two fixed-shape programs (``listen_step`` /
``speak_step`` with static ``wide``), each compiled once: the wide one only runs when some row
starts a turn or an answer, so steady chunks cost 2 LLM positions, not 2 + prefix. (The choice is
made on the host from the tiny state array; a ``lax.cond`` inside one program would make XLA copy
the whole KV cache every step.)
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.inference.dialogue import Event, State, transition
from fo_jax.inference.llm import init_cache, prefill, round_up
from fo_jax.inference.sampling import SamplingConfig, sample
from fo_jax.layers.kv_cache import KVCache
from fo_jax.models.adapter import SpeechInputState
from fo_jax.models.audio_llm import AudioLLM, ChatTemplate, speech_chunk, state_probs
from fo_jax.models.configs import ModelConfig

SYSTEM_BUCKET = 32
FBANK_OVERLAP = 3  # fbank frames shared by consecutive chunks (official chunk_overlap)


@flax.struct.dataclass
class Session:
    """One conversation per row.

    Attributes:
      speech: encoder + adapter streaming state of the current turn (user axis 0).
      fbank_overlap: (B, 3, F) the last fbank frames of the previous chunk (encoder conv context).
      cache: LLM KVCache, lengths (B,).
      turn_start: (B,) int32, cache length when the current user turn started (EL drops the turn).
      state: (B,) int32 ``dialogue.State``.
      last_token: (B,) int32, the last sampled token (fed by the next CS step).
      overflow: (B,) bool, a step found no room left in the cache; the row is no longer stepped.
    """

    speech: SpeechInputState
    fbank_overlap: jax.Array
    cache: KVCache
    turn_start: jax.Array
    state: jax.Array
    last_token: jax.Array
    overflow: jax.Array

    @property
    def batch(self) -> int:
        return self.state.shape[0]


def batch_axes(session: Session) -> Session:
    """Session-shaped tree of each leaf's user axis (0, except the KV cache's k / v: 1)."""
    axes = jax.tree.map(lambda _: 0, session)
    return axes.replace(cache=axes.cache.replace(k=1, v=1))


def stack_sessions(sessions: Sequence[Session]) -> Session:
    """Concatenates sessions along the user axis (same config and cache length)."""
    return jax.tree.map(lambda a, *xs: jnp.concatenate(xs, axis=a), batch_axes(sessions[0]), *sessions)


def take_rows(session: Session, rows: Sequence[int] | jax.Array) -> Session:
    """The sessions of ``rows`` (a new pytree; the input is untouched)."""
    rows = jnp.asarray(rows, jnp.int32)
    return jax.tree.map(lambda a, x: jnp.take(x, rows, axis=a), batch_axes(session), session)


def put_rows(session: Session, rows: Sequence[int] | jax.Array, values: Session) -> Session:
    """``session`` with ``rows`` replaced by the rows of ``values`` (e.g. a new user joining)."""
    rows = jnp.asarray(rows, jnp.int32)

    def put(a, x, v):
        idx = (slice(None),) * a + (rows,)
        return x.at[idx].set(v.astype(x.dtype))

    return jax.tree.map(put, batch_axes(session), session, values)


def prefill_system(params: dict, template: ChatTemplate, cfg: ModelConfig) -> KVCache:
    """The system-role prefix in a one-row cache: prefilled once, copied into sessions.

    Matches the official 'pre' step: the role ids without <|im_end|> (the first listen prefix
    closes the system turn).
    """
    ids = jnp.asarray(template.system_ids, jnp.int32)[None]
    n = ids.shape[1]
    t = round_up(n, SYSTEM_BUCKET)
    tokens = jnp.zeros((1, t), jnp.int32).at[:, :n].set(ids)
    _, _, cache = prefill(params["llm"], tokens, jnp.array([n], jnp.int32), init_cache(cfg.llm, 1, t), cfg=cfg.llm)
    return cache


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "max_len"))
def new_session(system_cache: KVCache, *, cfg: ModelConfig, batch: int, max_len: int) -> Session:
    """``batch`` fresh conversations that start after the system role, in state SL.

    ``system_cache`` (1 or ``batch`` rows) is only read, never donated: keep it for new users.
    """
    if system_cache.max_len > max_len:
        raise ValueError(f"max_len {max_len} is shorter than the system cache ({system_cache.max_len})")
    cache = init_cache(cfg.llm, batch, max_len)
    n = system_cache.max_len
    rows = lambda a: jnp.broadcast_to(a, a.shape[:1] + (batch,) + a.shape[2:])  # noqa: E731
    k, v = rows(system_cache.k), rows(system_cache.v)
    lengths = jnp.broadcast_to(system_cache.lengths, (batch,)).astype(jnp.int32)
    cache = KVCache(k=cache.k.at[:, :, :, :n].set(k.astype(cache.k.dtype)),
                    v=cache.v.at[..., :n].set(v.astype(cache.v.dtype)), lengths=lengths)
    return Session(
        speech=SpeechInputState.zeros(cfg.encoder, cfg.adapter, batch),
        fbank_overlap=jnp.zeros((batch, FBANK_OVERLAP, cfg.encoder.input_dim), jnp.float32),
        cache=cache, turn_start=lengths, state=jnp.full((batch,), int(State.SL), jnp.int32),
        last_token=jnp.zeros((batch,), jnp.int32), overflow=jnp.zeros((batch,), bool))


def _rows(mask_b: jax.Array, new, old):
    """``new`` where mask_b else ``old``, leaf by leaf (user axis 0)."""
    return jax.tree.map(lambda n, o: jnp.where(mask_b.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def _last(hidden_btd: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, D) at each row's last valid position (row 0 when empty)."""
    idx = jnp.maximum(lengths_b - 1, 0)
    return jnp.take_along_axis(hidden_btd, idx[:, None, None], axis=1)[:, 0]


def _run_llm(model: AudioLLM, params: dict, x_btd: jax.Array, lengths_b: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Appends a block to the cache; returns each row's last valid hidden state (B, D) and the cache."""
    hidden, cache = model.apply({"params": params}, x_btd, lengths_b, cache, method=AudioLLM.decode)
    return _last(hidden, lengths_b), cache


def _any_state(session: Session, state: State) -> bool:
    """Host-side check (one tiny device read): does some row need the wide block?"""
    return bool(np.any(np.asarray(session.state) == state))


def _all(mask_b: jax.Array | None, b: int) -> jax.Array:
    return jnp.ones((b,), bool) if mask_b is None else jnp.asarray(mask_b, bool)


def listen(params: dict, session: Session, fbank_btf: jax.Array, active_b: jax.Array | None = None,
           decide_b: jax.Array | None = None, *, cfg: ModelConfig,
           template: ChatTemplate) -> tuple[Session, jax.Array]:
    """Feeds one chunk of speech per row: fbank -> encoder -> adapter -> LLM -> state head.

    Runs ``listen_step``, wide when some row starts a turn (state SL).

    Args:
      params: AudioLLM params.
      session: B sessions (donated).
      fbank_btf: (B, 16, F) the chunk's new log-mel fbank frames (CMVN is applied by the encoder).
      active_b: (B,) bool, rows that have a chunk now (default all).
      decide_b: (B,) bool, rows whose state-head decision counts (default all; False keeps
        listening, as the official server does for its VAD pre-roll chunks).
    Returns:
      the session (SL/CL rows move to CL, SS or EL) and (B, 3) float32 state probabilities (zero
      for rows that did not listen).
    """
    b = session.batch
    return listen_step(params, session, fbank_btf, _all(active_b, b), _all(decide_b, b), cfg=cfg,
                       template=template, wide=_any_state(session, State.SL))


@functools.partial(jax.jit, static_argnames=("cfg", "template", "wide"), donate_argnames=("session",))
def listen_step(params: dict, session: Session, fbank_btf: jax.Array, active_b: jax.Array,
                decide_b: jax.Array, *, cfg: ModelConfig, template: ChatTemplate,
                wide: bool) -> tuple[Session, jax.Array]:
    """``listen`` as one fixed-shape program. ``wide``: the LLM block has room for the turn
    prefix (needed when some row is in SL; SL rows are skipped otherwise)."""
    model = AudioLLM(cfg)
    b = session.batch
    expected = (b, cfg.encoder.stream_input_frames - FBANK_OVERLAP, cfg.encoder.input_dim)
    if fbank_btf.shape != expected:
        raise ValueError(f"listen: fbank chunk has shape {fbank_btf.shape}, expected {expected} "
                         "(the new frames of one 160 ms chunk per session)")
    is_sl = session.state == State.SL
    wants = active_b & (is_sl | (session.state == State.CL)) & ~session.overflow

    # Speech side: a turn starts with fresh encoder / adapter / overlap state (official inference).
    speech = session.speech.reset_rows(wants & is_sl)
    overlap = jnp.where((wants & is_sl)[:, None, None], 0.0, session.fbank_overlap)
    frames = jnp.concatenate([overlap, fbank_btf.astype(overlap.dtype)], axis=1)
    new_speech, audio = speech_chunk(params, cfg, speech, frames)

    # LLM side: [listen ids, prompts, audio] on a turn's first chunk, [audio] afterwards.
    n_audio = audio.shape[1]
    prefix = jnp.concatenate([
        model.apply({"params": params}, jnp.asarray(template.listen_ids, jnp.int32), method=AudioLLM.embed),
        model.apply({"params": params}, method=AudioLLM.prompts)], axis=0)
    n_prefix = prefix.shape[0]
    cache = session.cache
    need = jnp.where(is_sl, n_prefix + n_audio, n_audio)
    fits = cache.lengths + need <= cache.max_len
    on = wants & fits & (wide | ~is_sl)
    audio = audio.astype(prefix.dtype)
    if wide:  # SL rows: [prefix, audio]; CL rows: [audio, padding]
        first = jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape), audio], axis=1)
        later = jnp.pad(audio, ((0, 0), (0, n_prefix), (0, 0)))
        x = jnp.where(is_sl[:, None, None], first, later)
    else:
        x = audio

    start = cache.lengths
    hidden, cache = _run_llm(model, params, x, jnp.where(on, need, 0), cache)
    probs = state_probs(model.apply({"params": params}, hidden, method=AudioLLM.state_logits))
    probs = jnp.where(on[:, None], probs, 0.0)

    state = jnp.where(on, transition(session.state, Event.CHUNK_LISTENED, probs=probs, decide_b=decide_b),
                      session.state)
    turn_start = jnp.where(on & is_sl, start, session.turn_start)
    # 'el' drops the turn from the history, as the official server does (it listens on a copy).
    lengths = jnp.where(on & (state == State.EL), turn_start, cache.lengths)
    session = session.replace(
        speech=_rows(on, new_speech, session.speech),
        fbank_overlap=jnp.where(on[:, None, None], frames[:, -FBANK_OVERLAP:], session.fbank_overlap),
        cache=cache.replace(lengths=lengths), turn_start=turn_start, state=state,
        overflow=session.overflow | (wants & ~fits))
    return session, probs


def speak(params: dict, session: Session, rng_b: jax.Array, active_b: jax.Array | None = None, *,
          cfg: ModelConfig, template: ChatTemplate,
          sampling: SamplingConfig = SamplingConfig()) -> tuple[Session, jax.Array, jax.Array]:
    """Samples one answer token per speaking row.

    SS rows feed the assistant header, CS rows the last sampled token. Sampling <|im_end|> ends
    the answer (state SL); it is not fed back: the next turn's listen prefix starts with it.
    Runs ``speak_step``, wide when some row starts an answer (state SS).

    Args:
      params: AudioLLM params.
      session: B sessions (donated).
      rng_b: (B,) PRNG keys, one per row (a row's draw does not depend on the others).
      active_b: (B,) bool, rows to step (default all).
    Returns:
      the session, (B,) int32 tokens (-1 for rows that did not speak) and (B, D) the final-norm
      hidden state of the position that predicted each token (the speech decoder's input; zeros
      for rows that did not speak).
    """
    return speak_step(params, session, rng_b, _all(active_b, session.batch), cfg=cfg, template=template,
                      sampling=sampling, wide=_any_state(session, State.SS))


@functools.partial(jax.jit, static_argnames=("cfg", "template", "sampling", "wide"),
                   donate_argnames=("session",))
def speak_step(params: dict, session: Session, rng_b: jax.Array, active_b: jax.Array, *,
               cfg: ModelConfig, template: ChatTemplate, sampling: SamplingConfig,
               wide: bool) -> tuple[Session, jax.Array, jax.Array]:
    """``speak`` as one fixed-shape program (``wide``: room for the assistant header)."""
    model = AudioLLM(cfg)
    b = session.batch
    is_ss = session.state == State.SS
    wants = active_b & (is_ss | (session.state == State.CS)) & ~session.overflow
    header = jnp.asarray(template.speak_ids, jnp.int32)
    need = jnp.where(is_ss, header.shape[0], 1)
    cache = session.cache
    fits = cache.lengths + need <= cache.max_len
    on = wants & fits & (wide | ~is_ss)
    last = session.last_token[:, None]
    if wide:  # SS rows: the header; CS rows: [last token, padding]
        later = jnp.pad(last, ((0, 0), (0, header.shape[0] - 1)))
        tokens = jnp.where(is_ss[:, None], jnp.broadcast_to(header, (b, header.shape[0])), later)
    else:
        tokens = last
    x = model.apply({"params": params}, tokens, method=AudioLLM.embed)
    hidden, cache = _run_llm(model, params, x, jnp.where(on, need, 0), cache)
    logits = model.apply({"params": params}, hidden, method=AudioLLM.logits)
    token = jax.vmap(lambda lg, key: sample(lg[None], key, sampling)[0])(logits, rng_b)
    state = jnp.where(on, transition(session.state, Event.TOKEN_SAMPLED, is_end=token == template.end_id),
                      session.state)
    session = session.replace(cache=cache, state=state, last_token=jnp.where(on, token, session.last_token),
                              overflow=session.overflow | (wants & ~fits))
    return session, jnp.where(on, token, -1), jnp.where(on[:, None], hidden, 0)


@functools.partial(jax.jit, static_argnames=("event",), donate_argnames=("session",))
def apply_event(session: Session, event: Event, rows_b: jax.Array | None = None) -> Session:
    """Applies an outside event (VAD_START, VAD_END, INTERRUPTED, END_OF_INPUT) to ``rows_b``.

    VAD_END while listening drops the turn's speech from the history (as 'el' does).
    """
    if event in (Event.CHUNK_LISTENED, Event.TOKEN_SAMPLED):
        raise ValueError(f"{event.name} is applied by listen / speak")
    rows = jnp.ones_like(session.overflow) if rows_b is None else rows_b
    state = jnp.where(rows, transition(session.state, event), session.state)
    drop = rows & (event == Event.VAD_END) & (session.state == State.CL)
    lengths = jnp.where(drop, session.turn_start, session.cache.lengths)
    return session.replace(state=state, cache=session.cache.replace(lengths=lengths))
