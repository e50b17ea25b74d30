"""The dialogue state machine: one test per transition, and the state-head reading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.inference.dialogue import Event, State, transition
from fo_jax.models.audio_llm import (HEAD_KEEP_LISTENING, HEAD_START_SPEAKING, HEAD_STOP_LISTENING, decide,
                                     state_probs)

ALL = np.array([int(s) for s in State], np.int32)


def _only(event, changed: dict, **kw):
    """Applies ``event`` to every state; states not in ``changed`` must stay put."""
    out = np.asarray(transition(ALL, event, **kw))
    expected = np.array([int(changed.get(State(s), s)) for s in ALL])
    np.testing.assert_array_equal(out, expected)


def test_system_prefilled_moves_pre_to_start_listen():
    _only(Event.SYSTEM_PREFILLED, {State.PRE: State.SL})


def test_vad_start_opens_a_turn_from_any_state_after_pre():
    _only(Event.VAD_START, {s: State.SL for s in State if s != State.PRE})


@pytest.mark.parametrize("probs, after", [
    ([0.8, 0.1, 0.1], State.CL),  # keep listening
    ([0.1, 0.8, 0.1], State.SS),  # p1 > 0.5: start speaking
    ([0.1, 0.1, 0.8], State.EL),  # p2 > 0.5: stop listening
    ([0.3, 0.35, 0.35], State.CL),  # nobody above 0.5
])
def test_chunk_listened_reads_the_state_head(probs, after):
    p = jnp.broadcast_to(jnp.asarray(probs), (len(ALL), 3))
    _only(Event.CHUNK_LISTENED, {State.SL: after, State.CL: after}, probs=p)


def test_chunk_listened_without_decision_keeps_listening():
    p = jnp.broadcast_to(jnp.asarray([0.0, 1.0, 0.0]), (len(ALL), 3))
    _only(Event.CHUNK_LISTENED, {State.SL: State.CL, State.CL: State.CL}, probs=p,
          decide_b=jnp.zeros(len(ALL), bool))


def test_token_sampled_continues_speaking():
    _only(Event.TOKEN_SAMPLED, {State.SS: State.CS, State.CS: State.CS}, is_end=jnp.zeros(len(ALL), bool))


def test_end_token_goes_back_to_start_listen():
    _only(Event.TOKEN_SAMPLED, {State.SS: State.SL, State.CS: State.SL}, is_end=jnp.ones(len(ALL), bool))


def test_interrupted_answer_goes_back_to_start_listen():
    _only(Event.INTERRUPTED, {State.SS: State.SL, State.CS: State.SL})


def test_vad_end_stops_listening():
    _only(Event.VAD_END, {State.SL: State.EL, State.CL: State.EL})


def test_end_of_input_starts_speaking():
    _only(Event.END_OF_INPUT, {State.CL: State.SS})


def test_transition_is_elementwise_and_jittable():
    probs = jnp.array([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05], [0.0, 1.0, 0.0]])
    state = jnp.array([State.SL, State.CL, State.CL, State.CS], jnp.int32)
    out = jax.jit(lambda s, p: transition(s, Event.CHUNK_LISTENED, probs=p))(state, probs)
    np.testing.assert_array_equal(out, [State.SS, State.EL, State.CL, State.CS])
    assert int(transition(int(State.SS), Event.TOKEN_SAMPLED, is_end=True)) == State.SL


def test_missing_event_data_is_an_error():
    with pytest.raises(ValueError):
        transition(ALL, Event.CHUNK_LISTENED)
    with pytest.raises(ValueError):
        transition(ALL, Event.TOKEN_SAMPLED)


def test_state_head_reads_softmax_of_the_first_three_logits():
    # The 4th logit is ignored, however large.
    logits = jnp.array([[0.0, 2.0, 0.0, 50.0], [0.0, 0.0, 3.0, -50.0], [1.0, 1.0, 1.0, 9.0]])
    probs = state_probs(logits)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits[:, :3], axis=-1), rtol=1e-6)
    np.testing.assert_array_equal(decide(probs), [HEAD_START_SPEAKING, HEAD_STOP_LISTENING, HEAD_KEEP_LISTENING])


def test_state_head_thresholds():
    # Strictly above 0.5; stopping wins over speaking (it is checked first, as in the official code).
    cases = [([0.5, 0.5, 0.0], HEAD_KEEP_LISTENING), ([0.49, 0.51, 0.0], HEAD_START_SPEAKING),
             ([0.0, 0.5, 0.5], HEAD_KEEP_LISTENING), ([0.0, 0.49, 0.51], HEAD_STOP_LISTENING),
             ([0.2, 0.2, 0.6], HEAD_STOP_LISTENING)]
    probs = jnp.array([c[0] for c in cases])
    np.testing.assert_array_equal(decide(probs), [c[1] for c in cases])
