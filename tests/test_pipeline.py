"""End-to-end pipeline on a tiny random bundle: turns, speech assembly, no recompiles, interruption."""

import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

from fo_jax.errors import FoJaxError
from fo_jax.inference import pipeline as P
from fo_jax.inference import speech_decoder as sd
from fo_jax.inference.bundle import ServerSettings, load_bundle
from fo_jax.inference.dialogue import State
from fo_jax.inference.offline import context_plan, infer_file
from fo_jax.inference.sampling import SamplingConfig
from fo_jax.inference.text_segmentation import normalize_tts_text
from fo_jax.inference.vocoder_stream import vocode_reply
from fo_jax.testing.speech import speech_like_noise
from tests import bundle_utils as bu

GREEDY = P.EngineOptions(sampling=SamplingConfig(top_k=1), decoder_top_k=1, max_answer_tokens=40,
                         max_segment_tokens=8, max_speech_tokens=100)
SHORT = dataclasses.replace(GREEDY, max_speech_tokens=20)  # the same programs, less speech per segment
MAX_LEN = 512


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    # Quiet-point thresholds above any level: every vocoder window leaves as its own packet (random
    # weights make no quiet stretches), so segments are handed out in several packets.
    server = ServerSettings(decoder_seg_threshold_first_pack=2.0, decoder_seg_threshold=2.0)
    return load_bundle(bu.write_native_bundle(tmp_path_factory.mktemp("pipeline") / "bundle", server=server))


@pytest.fixture(scope="module")
def engine(bundle):
    return P.Engine(bundle, GREEDY)


_speech = speech_like_noise  # (seconds, seed) -> 16 kHz samples


def _turn(conv, seconds=2.0, seed=0, max_tokens=None):
    conv.listen(_speech(seconds, seed), decide=False)
    reply = conv.respond(max_tokens)
    return reply, reply.read()


def test_a_turn_feeds_the_decoder_and_vocoder_as_the_release(engine, monkeypatch):
    conv = P.Conversation(engine, max_len=MAX_LEN)  # warmed up
    starts = []
    real_start = sd.start
    monkeypatch.setattr(sd, "start", lambda *a, **k: starts.append((a, k)) or real_start(*a, **k))
    before = conv.context_length
    reply, audio = _turn(conv, seconds=1.5)
    tokens = reply.token_ids
    assert 0 < len(tokens) <= GREEDY.max_answer_tokens and reply.finished and not reply.interrupted
    assert conv.state == State.SL and conv.reply is None
    # The context holds the turn and every answer token: header, prompts, 10 chunks x 2 audio frames.
    t = conv.template
    assert conv.context_length == (before + len(t.listen_ids) + engine.cfg.adapter.prompt_num + 2 * 10
                                   + len(t.speak_ids) + len(tokens))
    # Segments tile the answer; each one's decoder input is the release's: the LLM input embeddings
    # of its normalised, re-tokenised text (NAR) and one hidden state per token (prefix).
    ends = [s.end_token for s in reply.segments]
    assert ends == sorted(ends) and ends[-1] == len(tokens) and reply.spoken_tokens == len(tokens)
    assert "".join(s.text for s in reply.segments) == reply.text
    assert len(starts) == len([s for s in reply.segments if s.tts_text])
    begin = 0
    for (args, kwargs), seg in zip(starts, reply.segments):
        _, _, text_embeds, hidden = args
        ids = engine.tokenizer.encode(normalize_tts_text(seg.text), add_special_tokens=False)
        np.testing.assert_array_equal(text_embeds, engine.embed_table[ids])
        assert hidden.shape == (seg.end_token - begin, engine.cfg.llm.hidden_size)
        assert kwargs["shapes"] == engine.shapes and kwargs["sampling"] == engine.decoder_sampling
        begin = seg.end_token
    # The interleaved vocoding equals the streaming vocoder run on the final token lists.
    ref = np.concatenate(list(vocode_reply([s.speech_token_ids for s in reply.segments], engine.decode_window,
                                           engine.vocoder)))
    np.testing.assert_array_equal(audio, ref)
    assert reply.samples == len(audio) and 0 < len(audio) <= 600 * len(reply.speech_token_ids)
    lat = reply.latency_ms()
    stages = [lat[k] for k in ("llm_interrupted_to_first_text_chunk", "first_text_chunk_to_decoder_prefill",
                               "decoder_prefill_to_first_speech_chunk", "first_speech_chunk_to_first_pcm")]
    assert all(s > 0 for s in stages) and lat["total"] == pytest.approx(sum(stages))


def test_full_vocoder_windows_decode_only_the_kept_audio(engine, monkeypatch):
    # The release's server.json: a segment's windows are 30 (0, 10), 40 (10, 10) while no packet has
    # left, 50 (0, 10), 60 (10, 10) afterwards; tails (trim (left, 0)) are padded and decoded whole.
    assert engine.window_trims == {(30, (0, 10)), (40, (10, 10)), (50, (0, 10)), (60, (10, 10))}
    spt = engine.cfg.codec.samples_per_token
    tokens = np.random.default_rng(0).integers(0, engine.cfg.codec.n_codes, 60).astype(np.int32)
    trims = []
    real = P.decode_chunk
    monkeypatch.setattr(P, "decode_chunk", lambda *a, **k: trims.append((a[1].shape[1], k["trim"])) or real(*a, **k))
    for size, (left, right) in sorted(engine.window_trims):
        whole = engine.decode_window(tokens[:size])
        kept = engine.decode_window(tokens[:size], (left, right))
        assert trims[-2:] == [(size, (0, 0)), (size, (left, right))]
        assert kept.shape == ((size - left - right) * spt,)
        np.testing.assert_allclose(kept, whole[left * spt:(size - right) * spt], atol=1e-5)
    tail = engine.decode_window(tokens[:25], (10, 0))  # padded to 30 with token 24 repeated
    assert trims[-1] == (30, (0, 0)) and tail.shape == (15 * spt,)
    padded = np.concatenate([tokens[:25], np.full(5, tokens[24], np.int32)])
    np.testing.assert_array_equal(tail, engine.decode_window(padded)[10 * spt:25 * spt])


def test_greedy_turns_are_deterministic_and_the_cache_carries_over(engine):
    runs = []
    for _ in range(2):
        conv = P.Conversation(engine, max_len=MAX_LEN, seed=1)
        first, audio1 = _turn(conv, seed=1)
        length = conv.context_length
        second, audio2 = _turn(conv, seconds=1.0, seed=2)
        assert conv.context_length > length  # the second turn was appended to the first
        runs.append((first.token_ids, first.speech_token_ids, audio1, second.token_ids, audio2))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    # A fresh conversation asked only the second question answers differently: the history counts.
    fresh = P.Conversation(engine, max_len=MAX_LEN, seed=1)
    alone, _ = _turn(fresh, seconds=1.0, seed=2)
    assert alone.token_ids != runs[0][3]


def test_no_compiles_during_a_20s_question_and_a_10s_answer(bundle):
    # 400 codec tokens per segment: the decoder cache grows once (384 -> 640 slots) in each.
    engine = P.Engine(bundle, dataclasses.replace(GREEDY, max_answer_tokens=16, max_speech_tokens=400))
    assert engine.shapes.full_len > engine.shapes.first_len
    max_len = context_plan(engine, P.DEFAULT_ROLE, 20.0, "forced")
    engine.warm_up(max_len)
    conv = P.Conversation(engine, max_len=max_len)
    count = engine.compiles.count
    probs = conv.listen(_speech(20.0, 3), decide=False)
    reply = conv.respond()
    audio = reply.read()
    assert len(probs) == 125 and len(audio) / 24000 >= 10.0, (len(probs), len(audio) / 24000)
    assert max(len(s.speech_token_ids) for s in reply.segments) == 400 > engine.shapes.first_len
    assert engine.compiles.count == count, engine.compiles.names_since(count)
    assert conv.listen_seconds / (125 * 0.16) < 1  # listening keeps up with the microphone here


ANSWER = "Paris is nice. I like dogs! The weather is nice today."


def _interrupted_turn(engine):
    """Turn 1 (a given answer text) interrupted inside its second segment's audio."""
    conv = P.Conversation(engine, max_len=MAX_LEN)
    conv.listen(_speech(1.92, 4), decide=False)  # 12 whole chunks
    answer_start = conv.context_length + len(conv.template.speak_ids)
    reply = conv.respond(force_tokens=engine.tokenizer.encode(ANSWER, add_special_tokens=False))
    for _ in reply:
        if len(reply.segments) == 2 and reply.segments[1].samples > 0:
            break
    assert not reply.segments[1].complete  # one packet of several
    assert conv.interrupt() is reply
    return conv, reply, answer_start


def test_interrupt_keeps_the_spoken_text_and_the_next_turn_works(engine):
    engine.warm_up(MAX_LEN)
    compiled = engine.compiles.count
    conv, reply, answer_start = _interrupted_turn(engine)
    spoken = reply.segments[0].end_token
    assert reply.interrupted and reply.finished and not reply.segments[1].complete
    assert reply.spoken_tokens == spoken < len(reply.token_ids)
    assert reply.spoken_text == engine.tokenizer.decode(reply.token_ids[:spoken], skip_special_tokens=True)
    assert list(reply) == []  # nothing more comes out
    assert conv.state == State.SL and conv.context_length == answer_start + spoken
    second, audio = _turn(conv, seconds=1.0, seed=5)
    assert second.token_ids and len(audio)

    # The same dialogue whose first answer was exactly the spoken part gives the same second turn.
    ref = P.Conversation(engine, max_len=MAX_LEN)
    ref.listen(_speech(1.92, 4), decide=False)
    first = ref.respond(force_tokens=reply.token_ids[:spoken])
    first.read()
    assert first.token_ids == reply.token_ids[:spoken] and not first.interrupted
    assert ref.context_length == answer_start + spoken
    ref_second, ref_audio = _turn(ref, seconds=1.0, seed=5)
    assert ref_second.token_ids == second.token_ids and ref_second.speech_token_ids == second.speech_token_ids
    np.testing.assert_allclose(ref_audio, audio, atol=1e-5)
    assert engine.compiles.names_since(compiled) == []  # forced text, interruption: nothing new
    n = ref.context_length
    assert conv.context_length == n
    keys = [np.asarray(c.session.cache.k)[:, :, :, :n] for c in (conv, ref)]  # (L, B, K, S, H)
    np.testing.assert_allclose(keys[0], keys[1], atol=1e-5)


def test_interrupt_from_another_thread_and_before_the_first_step(engine, monkeypatch):
    conv = P.Conversation(engine, max_len=MAX_LEN)
    conv.listen(_speech(1.0, 6), decide=False)
    reply = conv.respond()
    inside, errors, real = threading.Event(), [], engine.decode_window

    def window(tokens, trim):  # the 2nd vocoder window waits inside the player's step for interrupt()
        if inside.is_set() is False and reply.packets >= 1:
            inside.set()
            while not reply._stop:
                time.sleep(0.001)
        return real(tokens, trim)

    monkeypatch.setattr(engine, "decode_window", window)

    def play():
        try:
            for _ in reply:
                pass
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    player = threading.Thread(target=play)
    player.start()
    assert inside.wait(60)
    assert conv.interrupt() is reply and reply.finished and reply.interrupted  # waited for the step
    player.join(60)
    assert not player.is_alive() and not errors
    assert reply.spoken_tokens < len(reply.token_ids) and conv.state == State.SL
    # Interrupted before anything was generated: nothing enters the context.
    monkeypatch.undo()
    length = conv.context_length
    conv.listen(_speech(0.5, 7), decide=False)
    reply = conv.respond()
    heard = conv.context_length
    assert conv.interrupt() is reply and reply.token_ids == [] and conv.context_length == heard > length
    assert conv.interrupt() is None
    with pytest.raises(FoJaxError, match="nothing to answer"):
        conv.respond()


def test_forced_answer_tokens_are_spoken_and_kept(engine):
    ids = engine.tokenizer.encode("Paris is nice. I like music, books and dogs!", add_special_tokens=False)
    conv = P.Conversation(engine, max_len=MAX_LEN)
    conv.listen(_speech(0.48, 10), decide=False)  # 3 whole chunks: nothing left to pad
    start = conv.context_length
    reply = conv.respond(force_tokens=ids)
    reply.read()
    assert reply.token_ids == ids and reply.text == engine.tokenizer.decode(ids) and not reply.interrupted
    # Sentence ends split (the release's rules), and the 8-token cap cuts the long sentence.
    assert reply.segments[0].text == "Paris is nice." and "".join(s.text for s in reply.segments) == reply.text
    sizes = np.diff([0] + [s.end_token for s in reply.segments])
    assert len(sizes) == 3 and max(sizes) == GREEDY.max_segment_tokens
    assert conv.context_length == start + len(conv.template.speak_ids) + len(ids) and conv.state == State.SL


def test_the_bundle_decides_whether_clauses_split_the_reply(bundle, engine):
    text = "Well then, Paris."  # 7 tokens of the test vocabulary: under the 8-token segment cap
    ids = engine.tokenizer.encode(text, add_special_tokens=False)

    def segments(eng):
        conv = P.Conversation(eng, max_len=MAX_LEN)
        conv.listen(_speech(0.48, 10), decide=False)
        reply = conv.respond(force_tokens=ids)
        reply.read()
        return [s.text for s in reply.segments]

    # The release's server: a clause end splits the first segment once it holds >= 4 hidden states.
    assert segments(engine) == ["Well then,", " Paris."]
    whole = dataclasses.replace(bundle, server=dataclasses.replace(bundle.server, text_clause_splits=0))
    assert segments(P.Engine(whole, GREEDY)) == [text]


def test_a_reply_in_progress_blocks_listening(engine):
    conv = P.Conversation(engine, max_len=MAX_LEN)
    conv.listen(_speech(0.5, 8), decide=False)
    reply = conv.respond()
    with pytest.raises(FoJaxError, match="a reply is in progress"):
        conv.listen(_speech(0.5, 8))
    reply.read()
    conv.listen(_speech(0.5, 8))


def _with_state_bias(bundle, index):
    """The bundle with the state head's class ``index`` always winning."""
    params = jax.tree.map(np.array, bundle.params)
    params["audiollm"]["state_head"]["bias"][index] = 30.0
    return dataclasses.replace(bundle, params=params)


def test_duplex_follows_the_state_head(bundle, tmp_path):
    import soundfile as sf

    wav = tmp_path / "q.wav"
    sf.write(wav, _speech(1.0, 9), 16000)
    speak = P.Engine(_with_state_bias(bundle, 1), SHORT)  # "start speaking" after every chunk
    audio, report = infer_file(speak, wav, mode="duplex", progress=False)
    # Each chunk is a whole question: 7 chunks (1 s zero-padded), 7 answers.
    assert len(report["turns"]) == 7 and len(audio) > 0 and report["compiles"]["after_warm_up"] == 0
    assert [t["input_seconds"] for t in report["turns"]] == pytest.approx([0.16 * (i + 1) for i in range(7)])

    drop = P.Engine(_with_state_bias(bundle, 2), SHORT)  # "stop listening": every turn is dropped
    audio, report = infer_file(drop, wav, mode="duplex", progress=False)
    assert report["turns"] == [] and len(audio) == 0 and len(report["state_probs"]) == 7
    assert all(p[2] > 0.99 for p in report["state_probs"])
    system = len(drop.system(P.DEFAULT_ROLE)[0].system_ids)
    assert report["context"]["used"] == system  # nothing of the dropped turns stays in the context
