"""Sessions: listen / speak against a from-scratch forward, end of turn, batching, no retrace."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_jax.inference import session as S
from fo_jax.inference.dialogue import Event, State
from fo_jax.inference.llm import init_cache
from fo_jax.inference.sampling import SamplingConfig
from fo_jax.models.adapter import SpeechInputState
from fo_jax.models.audio_llm import AudioLLM, speech_chunk, state_probs
from tests.test_session_utils import TEMPLATE, TINY, tiny_params

GREEDY = SamplingConfig(top_k=1)
MAX_LEN = 512


def _chunks(n, seed, batch=1):
    """n chunks of (batch, 16, 80) fbank-like frames."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(batch, 16, 80)) * 3 + 8, jnp.float32) for _ in range(n)]


def _step(p, sess, chunk, decide=True, active=None):
    """One listen call; decide=False keeps listening whatever the state head says."""
    b = sess.batch
    active = jnp.ones((b,), bool) if active is None else jnp.asarray(active)
    return S.listen(p, sess, chunk, active, jnp.full((b,), decide), cfg=TINY, template=TEMPLATE)


def _listen(p, sess, chunks):
    """Listens to every chunk, ignoring the state head (keeps listening)."""
    probs = []
    for c in chunks:
        sess, pr = _step(p, sess, c, decide=False)
        probs.append(np.asarray(pr))
    return sess, probs


def _speak(p, sess, n, sampling=GREEDY, seed=0):
    out = []
    for i in range(n):
        keys = jax.random.split(jax.random.key(seed + i), sess.batch)
        sess, tok, hidden = S.speak(p, sess, keys, cfg=TINY, template=TEMPLATE, sampling=sampling)
        out.append((np.asarray(tok), np.asarray(hidden)))
    return sess, out


_speech_chunk = jax.jit(speech_chunk, static_argnums=1)


def _turn_audio(p, chunks):
    """The speech embeddings of one turn, streamed from a fresh state (zero overlap frames)."""
    state = SpeechInputState.zeros(TINY.encoder, TINY.adapter, 1)
    overlap = jnp.zeros((1, 3, 80))
    embs = []
    for c in chunks:
        frames = jnp.concatenate([overlap, c], axis=1)
        state, emb = _speech_chunk(p, TINY, state, frames)
        overlap = frames[:, -3:]
        embs.append(emb[0])
    return jnp.concatenate(embs)


def _assert_rows_equal(batched, singles, atol=1e-5):
    """Row i of ``batched`` equals ``singles[i]`` (cache slots past the filled length may differ)."""
    for i, single in enumerate(singles):
        row = S.take_rows(batched, [i])
        n = int(single.cache.lengths[0])
        assert int(row.cache.lengths[0]) == n
        np.testing.assert_allclose(row.cache.k[:, :, :, :n], single.cache.k[:, :, :, :n], atol=atol)
        np.testing.assert_allclose(row.cache.v[..., :n], single.cache.v[..., :n], atol=atol)
        rest = lambda s: s.replace(cache=None)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol), rest(row), rest(single))


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def system(params):
    return S.prefill_system(params, TEMPLATE, TINY)


def _apply(p, method, *args):
    return AudioLLM(TINY).apply({"params": p}, *args, method=method)


@jax.jit
def _from_scratch(p, x_btd):
    """The whole conversation as one block into a fresh cache: (hidden, cache)."""
    return _apply(p, AudioLLM.decode, x_btd, None, init_cache(TINY.llm, 1, MAX_LEN))


def test_two_turns_equal_a_from_scratch_forward_and_end_token_is_not_fed(params, system):
    p = params
    turn1, turn2 = _chunks(3, 1), _chunks(2, 2)
    # Greedy run to see the answer, then make the 3rd answer token come out as <|im_end|> instead:
    # its lm_head row (torch layout (V, D)) becomes a slightly scaled copy of that token's row.
    sess = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)
    sess, _ = _listen(p, sess, turn1)
    sess, spoken = _speak(p, S.apply_event(sess, Event.END_OF_INPUT), 6)
    answer = [int(t[0]) for t, _ in spoken]
    k = next(i for i in range(2, 6) if answer[i] not in answer[:i] and answer[i] != TEMPLATE.end_id)
    head = p["llm"]["lm_head"]["kernel"]
    p = dict(p, llm=dict(p["llm"], lm_head={"kernel": head.at[TEMPLATE.end_id].set(head[answer[k]] * 1.001)}))

    sess = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)
    assert int(sess.state[0]) == State.SL and int(sess.cache.lengths[0]) == len(TEMPLATE.system_ids)
    sess, probs1 = _listen(p, sess, turn1)
    assert int(sess.state[0]) == State.CL
    sess = S.apply_event(sess, Event.END_OF_INPUT)
    assert int(sess.state[0]) == State.SS
    sess, spoken = _speak(p, sess, k + 1)
    tokens = [int(t[0]) for t, _ in spoken]
    assert tokens == answer[:k] + [TEMPLATE.end_id]
    assert int(sess.state[0]) == State.SL  # the end token closed the turn...
    n_prompt = TINY.adapter.prompt_num
    turn1_len = len(TEMPLATE.listen_ids) + n_prompt + 2 * len(turn1)
    # ...and was not fed: the header + k answer tokens are in the cache, not the end token.
    expected_len = len(TEMPLATE.system_ids) + turn1_len + len(TEMPLATE.speak_ids) + k
    assert int(sess.cache.lengths[0]) == expected_len
    sess, probs2 = _listen(p, sess, turn2)  # next turn: its prefix starts with <|im_end|>

    # From scratch: the whole conversation as one block.
    emb = lambda ids: _apply(p, AudioLLM.embed, jnp.asarray(ids, jnp.int32))
    prompts = _apply(p, AudioLLM.prompts)
    parts = [emb(TEMPLATE.system_ids), emb(TEMPLATE.listen_ids), prompts, _turn_audio(p, turn1),
             emb(TEMPLATE.speak_ids), emb(answer[:k]), emb(TEMPLATE.listen_ids), prompts, _turn_audio(p, turn2)]
    x = jnp.concatenate(parts)[None]
    n = x.shape[1]
    assert int(sess.cache.lengths[0]) == n
    hidden, ref = _from_scratch(p, x)
    np.testing.assert_allclose(sess.cache.k[:, :, :, :n], ref.k[:, :, :, :n], atol=2e-5)
    np.testing.assert_allclose(sess.cache.v[..., :n], ref.v[..., :n], atol=2e-5)
    ref_probs = state_probs(_apply(p, AudioLLM.state_logits, hidden[0]))
    # State probs at each chunk's last position, both turns.
    sys_len = len(TEMPLATE.system_ids)
    ends1 = [sys_len + turn1_len - 2 * (len(turn1) - 1 - i) - 1 for i in range(len(turn1))]
    ends2 = [n - 2 * (len(turn2) - 1 - i) - 1 for i in range(len(turn2))]
    np.testing.assert_allclose(np.concatenate(probs1 + probs2), ref_probs[np.array(ends1 + ends2)], atol=1e-5)
    # Speak outputs: the hidden state of the position that predicted each token.
    answer_start = sys_len + turn1_len + len(TEMPLATE.speak_ids) - 1
    for i, (_, h) in enumerate(spoken):
        np.testing.assert_allclose(h[0], hidden[0, answer_start + i], atol=2e-5)


def test_state_head_decisions_drive_the_session(params, system):
    p = params
    bias = p["state_head"]["bias"]
    speak_now = dict(p, state_head=dict(p["state_head"], bias=bias.at[1].set(30.0)))
    stop = dict(p, state_head=dict(p["state_head"], bias=bias.at[2].set(30.0)))
    c1, c2 = _chunks(2, 3)
    sess = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)
    sess, pr = _step(speak_now, sess, c1)
    assert pr[0, 1] > 0.5 and int(sess.state[0]) == State.SS

    # 'el' drops the turn: the cache goes back to where the turn started.
    sess = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)
    sess, _ = _listen(p, sess, [c1])
    sess, pr = _step(stop, sess, c2)
    assert pr[0, 2] > 0.5 and int(sess.state[0]) == State.EL
    assert int(sess.cache.lengths[0]) == len(TEMPLATE.system_ids)
    # Listening in EL does nothing until the VAD opens a new turn.
    before = jax.tree.map(jnp.copy, sess)
    sess, pr = _step(p, sess, c1)
    assert not np.any(pr)
    _assert_rows_equal(sess, [before], atol=0)
    sess = S.apply_event(sess, Event.VAD_START)
    sess, _ = _step(p, sess, c1)
    first_chunk = len(TEMPLATE.listen_ids) + TINY.adapter.prompt_num + 2
    assert int(sess.cache.lengths[0]) == len(TEMPLATE.system_ids) + first_chunk

    # VAD end while listening drops the turn as well; an interrupted answer keeps what was said.
    sess = S.apply_event(sess, Event.VAD_END)
    assert int(sess.state[0]) == State.EL and int(sess.cache.lengths[0]) == len(TEMPLATE.system_ids)
    sess = S.apply_event(sess, Event.VAD_START)
    sess, _ = _step(speak_now, sess, c1)
    sess, _ = _speak(p, sess, 2)
    length = int(sess.cache.lengths[0])
    sess = S.apply_event(sess, Event.INTERRUPTED)
    assert int(sess.state[0]) == State.SL and int(sess.cache.lengths[0]) == length


def test_batch_of_four_equals_four_single_steps(params, system):
    p = params
    sampling = SamplingConfig(temperature=1.0, top_k=8)
    singles = [S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN) for _ in range(4)]
    singles[1], _ = _listen(p, singles[1], _chunks(2, 10))  # CL
    singles[2], _ = _listen(p, singles[2], _chunks(3, 11))
    singles[2] = S.apply_event(singles[2], Event.END_OF_INPUT)  # SS
    singles[3], _ = _listen(p, singles[3], _chunks(1, 12))
    singles[3], _ = _speak(p, S.apply_event(singles[3], Event.END_OF_INPUT), 2)  # CS
    assert [int(s.state[0]) for s in singles] == [State.SL, State.CL, State.SS, State.CS]
    batched = S.stack_sessions([jax.tree.map(jnp.copy, s) for s in singles])

    for seed in (13, 14):  # a turn-opening (wide) call, then a steady one
        fbank = _chunks(1, seed, batch=4)[0]
        batched, probs = _step(p, batched, fbank, decide=False)
        for i in range(4):
            singles[i], pr = _step(p, singles[i], fbank[i:i + 1], decide=False)
            np.testing.assert_allclose(probs[i], pr[0], atol=1e-5)
        assert np.all(probs[:2] > 0) and not np.any(probs[2:])  # speaking rows do not listen
        _assert_rows_equal(batched, singles)

    # One speak call with rows that start (SS) and continue (CS) answers, the others idle.
    keys = jax.random.split(jax.random.key(5), 4)
    batched, tokens, hidden = S.speak(p, batched, keys, cfg=TINY, template=TEMPLATE, sampling=sampling)
    assert np.all(np.asarray(tokens[:2]) == -1) and np.all(np.asarray(tokens[2:]) >= 0)
    for i in range(4):
        singles[i], tok, h = S.speak(p, singles[i], keys[i:i + 1], cfg=TINY, template=TEMPLATE, sampling=sampling)
        assert int(tokens[i]) == int(tok[0])
        if int(tok[0]) >= 0:
            np.testing.assert_allclose(hidden[i], h[0], atol=1e-5)
    _assert_rows_equal(batched, singles)


def test_steps_compile_once_over_a_30s_stream(params, system):
    p = params
    sess = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)
    chunks = _chunks(4, 20)
    sess, _ = _listen(p, sess, chunks[:2])  # warm-up: turn-opening and steady programs
    sess = S.apply_event(sess, Event.END_OF_INPUT)
    sess, _ = _speak(p, sess, 2)
    sess = S.apply_event(sess, Event.INTERRUPTED)
    sizes = S.listen_step._cache_size(), S.speak_step._cache_size(), S.apply_event._cache_size()
    for turn in range(2):  # 30 s = 188 chunks of 160 ms, over two turns, each followed by an answer
        for i in range(94):
            sess, _ = _step(p, sess, chunks[i % 4], decide=False)
        sess = S.apply_event(sess, Event.END_OF_INPUT)
        sess, spoken = _speak(p, sess, 3)
        sess = S.apply_event(sess, Event.INTERRUPTED)
    assert (S.listen_step._cache_size(), S.speak_step._cache_size(), S.apply_event._cache_size()) == sizes
    assert not bool(sess.overflow[0])
    assert int(sess.speech.encoder.frames[0]) == 94 * TINY.encoder.chunk_size  # reset at each turn


def test_system_cache_is_reused_not_donated(params, system):
    a = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)
    c = _chunks(1, 30)[0]
    a, pa = _step(params, a, c)
    b = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)  # still valid after a's donated steps
    b, pb = _step(params, b, c)
    np.testing.assert_array_equal(pa, pb)
    assert not system.k.is_deleted()


def test_full_cache_sets_overflow_and_leaves_the_row(params, system):
    sess = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)
    first = len(TEMPLATE.listen_ids) + TINY.adapter.prompt_num + 2
    sess = sess.replace(cache=sess.cache.replace(lengths=jnp.array([MAX_LEN - first - 1])))  # a long history
    c = _chunks(1, 40)[0]
    sess, _ = _listen(params, sess, [c])
    assert int(sess.cache.lengths[0]) == MAX_LEN - 1 and not bool(sess.overflow[0])
    sess, pr = _step(params, sess, c)  # needs 2 slots, 1 left
    assert bool(sess.overflow[0]) and int(sess.cache.lengths[0]) == MAX_LEN - 1 and not np.any(pr)
    sess = S.apply_event(sess, Event.END_OF_INPUT)
    sess, out = _speak(params, sess, 1)
    assert int(out[0][0][0]) == -1 and int(sess.cache.lengths[0]) == MAX_LEN - 1  # overflowed rows stay put


def test_inactive_rows_are_untouched_and_rows_round_trip(params, system):
    sess = S.new_session(system, cfg=TINY, batch=4, max_len=MAX_LEN)
    sess, _ = _step(params, sess, _chunks(1, 50, batch=4)[0], decide=False,
                       active=[True, False, True, False])
    np.testing.assert_array_equal(sess.state, [State.CL, State.SL, State.CL, State.SL])
    first = len(TEMPLATE.system_ids)
    np.testing.assert_array_equal(sess.cache.lengths, [first + 11, first, first + 11, first])
    swapped = S.put_rows(sess, [0, 1], S.take_rows(sess, [1, 0]))
    np.testing.assert_array_equal(swapped.cache.lengths, [first, first + 11, first + 11, first])
    np.testing.assert_array_equal(swapped.cache.k[:, 1], sess.cache.k[:, 0])


def test_steps_update_the_kv_cache_in_place(params, system):
    """No step copies the KV cache: donation + in-place writes, and attention reads each layer's
    keys and values in the cache's own layouts (no per-layer transposed copy either)."""
    sess = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)
    whole = sorted(d for d in sess.cache.k.shape if d != 1)  # L, K, S, H in some order (one row)
    layer = sorted(d for d in sess.cache.k.shape[2:] if d != 1)  # one layer of one row
    ones = jnp.ones((1,), bool)
    keys = jax.random.split(jax.random.key(0), 1)
    for wide in (False, True):
        programs = [S.listen_step.lower(params, sess, _chunks(1, 0)[0], ones, ones, cfg=TINY, template=TEMPLATE,
                                        wide=wide),
                    S.speak_step.lower(params, sess, keys, ones, cfg=TINY, template=TEMPLATE, sampling=GREEDY,
                                       wide=wide)]
        for lowered in programs:
            hlo = lowered.compile().as_text()
            copies = []
            for line in hlo.splitlines():  # "%copy_bitcast_fusion.3 = f32[2,64,1024]{2,1,0} fusion(...)"
                m = re.match(r"\s*(ROOT )?%(\S+) = f32\[([\d,]*)\]", line)
                if m and "copy" in m[2] and m[3]:
                    dims = [int(d) for d in m[3].split(",") if d != "1"]
                    if sorted(dims) in (whole, layer):
                        copies.append(line.strip()[:160])
            assert not copies, copies[:2]


def test_bad_inputs_are_refused(params, system):
    sess = S.new_session(system, cfg=TINY, batch=1, max_len=MAX_LEN)
    with pytest.raises(ValueError, match=r"fbank chunk has shape \(1, 19, 80\), expected \(1, 16, 80\)"):
        S.listen(params, sess, jnp.zeros((1, 19, 80)), cfg=TINY, template=TEMPLATE)
    with pytest.raises(ValueError, match="CHUNK_LISTENED is applied by listen"):
        S.apply_event(sess, Event.CHUNK_LISTENED)
