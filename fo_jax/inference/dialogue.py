"""The duplex dialogue states of Freeze-Omni as a pure state machine.

A session is always in one of six states (the official names in brackets):

  PRE (pre)  the system role is not in the LLM cache yet.
  SL  (sl)   start listen: the next audio chunk opens a user turn; the LLM gets the user header,
             the learned prompts and the chunk's audio.
  CL  (cl)   continue listen: the LLM gets each chunk's audio only.
  SS  (ss)   start speak: the next speak step feeds the assistant header and samples a token.
  CS  (cs)   continue speak: each speak step feeds the last sampled token.
  EL  (el)   end listen: the user's speech needs no answer; nothing is fed until a new turn.

``transition`` is elementwise over a batch of sessions and works on Python ints and inside jit.
Events that do not apply to a state leave it unchanged.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from fo_jax.models.audio_llm import HEAD_KEEP_LISTENING, HEAD_START_SPEAKING, HEAD_STOP_LISTENING, decide


class State(enum.IntEnum):
    PRE = 0
    SL = 1
    CL = 2
    SS = 3
    CS = 4
    EL = 5


class Event(enum.IntEnum):
    SYSTEM_PREFILLED = 0  # the system-role prefix is in the cache
    VAD_START = 1  # the VAD heard speech: a new user turn starts (also stops any answer)
    CHUNK_LISTENED = 2  # one audio chunk went through the LLM; needs the state-head probs
    TOKEN_SAMPLED = 3  # a speak step sampled a token; needs is_end (the token is <|im_end|>)
    INTERRUPTED = 4  # the answer is cut off (barge-in, token budget, client stop)
    VAD_END = 5  # the VAD heard a long silence: stop listening without answering
    END_OF_INPUT = 6  # offline use: the whole question was listened to, answer now

LISTENING = (State.SL, State.CL)
SPEAKING = (State.SS, State.CS)

# State-head class -> the state after a listened chunk.
_AFTER_CHUNK = {HEAD_KEEP_LISTENING: State.CL, HEAD_START_SPEAKING: State.SS, HEAD_STOP_LISTENING: State.EL}


def _isin(state: jax.Array, states: tuple[State, ...]) -> jax.Array:
    return jnp.isin(state, jnp.asarray([int(s) for s in states], jnp.int32))


def transition(state, event: Event, *, probs=None, is_end=None, decide_b=None) -> jax.Array:
    """The state after ``event``, elementwise.

    Args:
      state: (B,) or scalar int, current ``State`` values.
      event: one ``Event`` (a Python value: which rule applies is static).
      probs: (B, 3) state-head probabilities, for CHUNK_LISTENED.
      is_end: (B,) bool, the sampled token is <|im_end|>, for TOKEN_SAMPLED.
      decide_b: (B,) bool, for CHUNK_LISTENED: False ignores the head and keeps listening (the
        official server does this for the VAD pre-roll chunks). Default: decide everywhere.
    Returns:
      int32 array of the shape of ``state``.
    """
    state = jnp.asarray(state, jnp.int32)
    sl, cl, ss, cs, el = (jnp.int32(s) for s in (State.SL, State.CL, State.SS, State.CS, State.EL))
    if event == Event.SYSTEM_PREFILLED:
        new = jnp.where(state == State.PRE, sl, state)
    elif event == Event.VAD_START:
        new = jnp.where(state == State.PRE, state, sl)
    elif event == Event.CHUNK_LISTENED:
        if probs is None:
            raise ValueError("CHUNK_LISTENED needs the state-head probs")
        head = decide(probs)
        after = jnp.select([head == k for k in _AFTER_CHUNK], [jnp.int32(v) for v in _AFTER_CHUNK.values()], cl)
        if decide_b is not None:
            after = jnp.where(decide_b, after, cl)
        new = jnp.where(_isin(state, LISTENING), after, state)
    elif event == Event.TOKEN_SAMPLED:
        if is_end is None:
            raise ValueError("TOKEN_SAMPLED needs is_end")
        # <|im_end|> ends the turn; the token itself is not fed back (the next SL prefix starts with it).
        new = jnp.where(_isin(state, SPEAKING), jnp.where(is_end, sl, cs), state)
    elif event == Event.INTERRUPTED:
        new = jnp.where(_isin(state, SPEAKING), sl, state)
    elif event == Event.VAD_END:
        new = jnp.where(_isin(state, LISTENING), el, state)
    elif event == Event.END_OF_INPUT:
        new = jnp.where(state == State.CL, ss, state)
    else:
        raise ValueError(f"unknown event {event!r}")
    return new.astype(jnp.int32)
