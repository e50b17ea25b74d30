"""End-to-end spoken dialogue: 16 kHz speech in, text, 24 kHz speech out, turn after turn.

``Engine`` holds a loaded bundle, the tokenizer and the settings, and compiles every program a
conversation can run in ``warm_up`` (a fixed, bounded set: after it, nothing compiles again).
``Conversation`` is one user's dialogue; its LLM KV cache (``session.Session``) lives across turns::

  conv = Conversation(engine, system_role="You are a helpful assistant.")
  conv.listen(samples_16k, decide=False)     # 160 ms chunks: fbank -> encoder -> adapter -> LLM
  reply = conv.respond()                     # the state head said "speak", or end of input
  for pcm in reply: play(pcm)                # 24 kHz float32 packets, produced while generating
  conv.interrupt()                           # barge-in: stops at once, keeps what was spoken

While a reply is iterated, each step samples one text token (``session.speak``); the text is cut
into segments (``text_segmentation``, the release's server policy unless ``server.json`` says
``text_clause_splits: 0``, plus a cut at ``max_segment_tokens``); each segment's normalised text
is re-tokenised and embedded (NAR input), its tokens' LLM hidden states prefix the speech
decoder, whose AR codec tokens go through the streaming vocoder (``vocoder_stream``) with the
``server.json`` settings. Everything runs in the caller's thread, one stage after the other, as
the release's server does per user.

Fixed shapes: speech-decoder segments use ``SegmentShapes`` buckets; vocoder windows are the
release's full window sizes (decoded trimmed to the audio the stream keeps), and a segment's last
(shorter) window is padded to the next of them with its last token repeated, then cut (the
release decodes that tail unpadded, so its last ~10 tokens of audio differ slightly; the
alternative is a program per tail length). Speech-decoder ids that are not codec codes (the
specials; only untrained models emit them) are skipped.

Interruption keeps the answer in the LLM context up to the end of the last segment whose audio was
completely handed out (``Reply.spoken_tokens``); the rest is cut from the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fo_jax.audio.fbank import CHUNK_OVERLAP, CHUNK_SAMPLES, CHUNK_SECONDS, FbankStreamState, fbank_stream_step
from fo_jax.errors import FoJaxError
from fo_jax.inference import session as S
from fo_jax.inference import speech_decoder as sd
from fo_jax.inference import text_segmentation as ts
from fo_jax.inference.bundle import Bundle
from fo_jax.inference.dialogue import Event, State
from fo_jax.inference.sampling import SamplingConfig
from fo_jax.inference.vocoder_stream import finish_segment, push_tokens, start_segment, trim_first_packet
from fo_jax.layers.kv_cache import KVCache
from fo_jax.models.audio_llm import ChatTemplate
from fo_jax.models.codec import decode_chunk, inference_global_tokens
from fo_jax.models.mel_codec import MelVQCodec, MelVQConfig
from fo_jax.runtime import CompileCounter
from fo_jax.text.tokenizer import load_tokenizer

DEFAULT_ROLE = "You are a helpful assistant."  # the release's offline script
TEXT_MARGIN = 16  # re-tokenised segment text may be a few tokens longer than the segment
# The paper's latency table, in order: each stage ends at its event (seconds since the decision).
LATENCY_EVENTS = ("first_text_chunk", "decoder_prefill", "first_speech_chunk", "first_pcm")


class ContextFull(FoJaxError):
    """The conversation no longer fits in the LLM KV cache (``max_len``)."""


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Generation settings.

    Attributes:
      sampling: LLM text sampling (default: the release's top-k 5, top-p 0.8, temperature 0.7).
      decoder_top_k: speech-decoder top-k (None: ``server.json``'s decoder_top_k).
      max_answer_tokens: text tokens per answer (the release's server: 500).
      max_segment_tokens: a segment is cut after this many tokens even without punctuation (the
        release has no such cut; it bounds the speech decoder's shapes).
      max_speech_tokens: codec tokens per segment (None: the decoder's max_tokens, 1000).
      segmentation: split rules (None: the bundle's ``server.json``, ``ServerSettings.segmentation``).
    """

    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_k=5, top_p=0.8)
    decoder_top_k: int | None = None
    max_answer_tokens: int = 500
    max_segment_tokens: int = 64
    max_speech_tokens: int | None = None
    segmentation: ts.SegmentationPolicy | None = None

    def __post_init__(self):
        counts = (self.max_answer_tokens, self.max_segment_tokens, self.max_speech_tokens, self.decoder_top_k)
        if any(n is not None and n < 1 for n in counts):
            raise ValueError(f"invalid engine options (token counts and top-k must be >= 1): {self}")


@jax.jit
def _fbank_chunk(state: FbankStreamState, chunk_bn: jax.Array) -> tuple[FbankStreamState, jax.Array]:
    """(B, 2560) samples -> state, (B, 16, 80) new fbank frames (the session keeps the overlap)."""
    state, feats = fbank_stream_step(state, chunk_bn)
    return state, feats[:, CHUNK_OVERLAP:]


def _like(value: Any, ref: jax.Array) -> jax.Array:
    """A host value placed as ``ref`` is (device, commitment): compiled steps are keyed on placement."""
    return jax.device_put(np.asarray(value, ref.dtype), ref.sharding)


@jax.jit
def _step_keys(key: jax.Array, step: jax.Array) -> jax.Array:
    """(1,) PRNG keys of text step ``step``: draws do not depend on how the dialogue was chunked."""
    return jax.random.fold_in(key, step)[None]


class Engine:
    """A loaded model ready to talk: params on device, tokenizer, settings, compile bookkeeping.

    Args:
      bundle: from ``fo_jax.inference.bundle.load_bundle``.
      options: generation settings.
      tokenizer: default: the one in ``bundle.llm_path``.
    """

    def __init__(self, bundle: Bundle, options: EngineOptions = EngineOptions(), tokenizer: Any = None):
        cfg = bundle.config
        self.cfg, self.options, self.server = cfg, options, bundle.server
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(bundle.llm_path)
        self.chat_template = bundle.chat_template
        # Committed to one device whatever they came as (numpy, restored arrays): the compiled
        # programs are keyed on the inputs' placement, so every engine shares them.
        device = jax.devices()[0]
        self.params, self.decoder_params, self.codec_params = (
            jax.device_put(bundle.params[part], device) for part in ("audiollm", "decoder", "codec"))
        # The decoder's NAR input is the LLM's input embeddings of the re-tokenised text: gathered on
        # the host, so segments of any length need no program.
        self.embed_table = np.asarray(self.params["llm"]["embed_tokens"]["embedding"])
        self.vocoder = bundle.server.vocoder(cfg.codec)
        self.decoder_sampling = bundle.server.decoder_sampling(options.decoder_top_k)
        self.segmentation = (bundle.server.segmentation() if options.segmentation is None
                             else options.segmentation)
        max_speech = cfg.decoder.max_tokens if options.max_speech_tokens is None else options.max_speech_tokens
        self.shapes = sd.SegmentShapes((options.max_segment_tokens + TEXT_MARGIN) * cfg.decoder.frames_per_vector,
                                       max_speech)
        # The vocoder's full windows (size, trim): a segment's first, (0, lookahead), then the rest,
        # (left context, lookahead); the codec computes only the kept tokens' audio of those.
        v, pad = self.vocoder, self.vocoder.overlap_size
        self.window_trims = frozenset((left + chunk + pad, (left, pad))
                                      for chunk in (v.first_chunk_size, v.chunk_size) for left in (0, pad))
        self.windows = tuple(sorted({size for size, _ in self.window_trims}))
        if isinstance(cfg.codec, MelVQConfig):  # the toy's fast codec: numpy Griffin-Lim, nothing to compile
            self.mel_codec = MelVQCodec(cfg.codec, np.asarray(bundle.params["codec"]["codebook"]))
        else:
            self.mel_codec, self.global_tokens = None, inference_global_tokens(cfg.codec)
        self.compiles = CompileCounter()
        self.warm_up_compiles: dict[tuple[str, int], int] = {}
        self._systems: dict[str, tuple[ChatTemplate, KVCache]] = {}

    def system(self, role: str | None) -> tuple[ChatTemplate, KVCache]:
        """The chat template and the prefilled system-role cache of ``role`` (computed once per role)."""
        if role not in self._systems:
            template = ChatTemplate.from_tokenizer(self.tokenizer, role, self.chat_template)
            self._systems[role] = template, S.prefill_system(self.params, template, self.cfg)
        return self._systems[role]

    def decode_window(self, tokens: np.ndarray, trim: tuple[int, int] = (0, 0)) -> np.ndarray:
        """(T,) codec tokens, (left, right) -> (600 (T - left - right),) float32 samples of tokens
        ``left .. T - right`` (a ``vocoder_stream.DecodeWindowFn``).

        A full window (``window_trims``) is decoded trimmed: TiCodec computes only the kept audio
        plus its receptive field. Any other (a segment's tail) is padded up to a window size with
        its last token repeated and decoded whole, then cut: one program per window size.
        """
        t, (left, right) = len(tokens), trim
        spt = self.cfg.codec.samples_per_token
        if (t, trim) in self.window_trims:
            padded, done = np.asarray(tokens, np.int32), trim
        else:
            size = next((w for w in self.windows if w >= t), t)
            padded, done = np.concatenate([tokens, np.full(size - t, tokens[-1], np.int32)]).astype(np.int32), (0, 0)
        if self.mel_codec is not None:  # numpy: decodes the window whole
            samples, done = self.mel_codec.decode(padded), (0, 0)
        else:
            samples = np.asarray(decode_chunk(self.codec_params, jnp.asarray(padded[None]), self.global_tokens,
                                              config=self.cfg.codec, trim=done))[0]
        return samples[(left - done[0]) * spt:(t - right - done[0]) * spt]

    def warm_up(self, max_len: int, system_role: str | None = DEFAULT_ROLE) -> int:
        """Compiles every program a conversation with these settings can run; returns how many.

        A short dialogue through the real code paths, then each speech-decoder bucket, both decoder
        cache sizes and each vocoder window size. Once per (role, max_len).
        """
        key = (system_role, max_len)
        if key in self.warm_up_compiles:
            return 0
        before = self.compiles.count
        conv = Conversation(self, system_role=system_role, max_len=max_len, warm_up=False)
        conv._speech_cap = 2
        for _ in range(2):  # a turn: opening and steady chunks, end of input, a capped answer
            conv.listen(np.zeros(2 * CHUNK_SAMPLES, np.float32), decide=False)
            for _ in conv.respond(max_tokens=2):
                pass
        # Whatever the random draws above did: every session event, both speak programs (the
        # narrow one runs on a row that does not speak), every decoder bucket, the AR loop.
        sess = conv.session
        for event in (Event.VAD_START, Event.END_OF_INPUT, Event.INTERRUPTED, Event.VAD_END):
            sess = S.apply_event(sess, event)
        for _ in range(2):
            sess, _, _ = S.speak(self.params, sess, _step_keys(conv._key, np.int32(0)), cfg=self.cfg,
                                 template=conv.template, sampling=self.options.sampling)
        d = self.cfg.decoder

        def segment(frames: int) -> sd.DecoderState:
            x = np.zeros((frames, d.hidden_size), np.float32)
            return sd.start(self.decoder_params, d, x, x, max_tokens=self.shapes.max_tokens,
                            sampling=self.decoder_sampling, shapes=self.shapes)

        for b in self.shapes.buckets:
            state = segment(b)
        for _ in sd.decode_tokens(self.decoder_params, d, state, max_tokens=1, sampling=self.decoder_sampling,
                                  shapes=self.shapes):  # the AR loop's host reads
            pass
        # A fresh state's step and a stepped state's differ in their inputs' placement: both, at
        # both cache sizes (grown after a step, as the AR loop grows).
        step = functools.partial(sd.decode_step, self.decoder_params, cfg=d, sampling=self.decoder_sampling)
        state, _ = step(segment(16))
        state, _ = step(state)
        if self.shapes.full_len > self.shapes.first_len:
            state, _ = step(sd.grow(state, max_len=self.shapes.full_len))
        jax.block_until_ready(state)
        for size, trim in self.window_trims:
            self.decode_window(np.zeros(size, np.int32), trim)
        for size in self.windows:  # tails, padded to a window size
            self.decode_window(np.zeros(size, np.int32), (0, 0))
        jax.block_until_ready(sess)
        self.warm_up_compiles[key] = self.compiles.count - before
        return self.warm_up_compiles[key]


@dataclasses.dataclass
class SpokenSegment:
    """One speech-decoder run: a piece of the answer's text and its speech.

    Attributes:
      text: the raw text; tts_text: after the release's normalisation (what the decoder reads).
      end_token: index in ``Reply.token_ids`` past the segment's last token.
      speech_token_ids: the codec tokens; skipped: non-code ids the decoder emitted.
      samples: PCM samples handed out for it; complete: all of its audio was handed out.
    """

    text: str
    tts_text: str
    end_token: int
    speech_token_ids: list[int] = dataclasses.field(default_factory=list)
    skipped: int = 0
    samples: int = 0
    complete: bool = False


class Reply:
    """An answer being generated and spoken; iterate it for (p,) float32 PCM packets at 24 kHz.

    Attributes:
      token_ids: text tokens sampled so far (without <|im_end|>).
      segments: ``SpokenSegment`` list.
      spoken_tokens: tokens whose audio was completely handed out (segment granularity).
      timeline: seconds from the speak decision to each of ``LATENCY_EVENTS``.
      busy_seconds: time spent producing it (inside iteration, not in the caller's hands).
      interrupted / finished: how and whether it ended.
    """

    def __init__(self, conversation: "Conversation", decided_at: float, max_tokens: int, speech: bool = True):
        self.conversation = conversation
        self.decided_at = decided_at
        self.max_tokens = max_tokens
        self.speech = speech
        self.token_ids: list[int] = []
        self.segments: list[SpokenSegment] = []
        self.spoken_tokens = 0
        self.timeline: dict[str, float] = {}
        self.busy_seconds = 0.0
        self.samples = 0
        self.packets = 0
        self.interrupted = False
        self.finished = False
        self.context_full = False
        self._stop = False
        self._started = False
        self._lock = threading.Lock()  # one step at a time: iteration vs interrupt() from another thread
        self._gen = conversation._speak(self)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        with self._lock:
            self._started = True
            start = time.perf_counter()
            try:
                return next(self._gen)
            finally:
                self.busy_seconds += time.perf_counter() - start

    def _mark(self, event: str) -> None:
        self.timeline.setdefault(event, time.perf_counter() - self.decided_at)

    def _decode(self, count: int | None = None) -> str:
        ids = self.token_ids if count is None else self.token_ids[:count]
        return self.conversation.engine.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def text(self) -> str:
        return self._decode()

    @property
    def spoken_text(self) -> str:
        return self._decode(self.spoken_tokens)

    @property
    def speech_token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.speech_token_ids]

    @property
    def audio_seconds(self) -> float:
        return self.samples / self.conversation.engine.vocoder.sample_rate

    def latency_ms(self) -> dict[str, float] | None:
        """The paper's latency table for this reply (None if no audio came out): each stage's
        duration and the cumulative times, in ms from the speak decision."""
        if not all(e in self.timeline for e in LATENCY_EVENTS):
            return None
        times = [self.timeline[e] * 1e3 for e in LATENCY_EVENTS]
        names = ("llm_interrupted_to_first_text_chunk", "first_text_chunk_to_decoder_prefill",
                 "decoder_prefill_to_first_speech_chunk", "first_speech_chunk_to_first_pcm")
        stages = dict(zip(names, np.diff([0.0] + times).tolist()))
        return {**stages, "total": times[-1], **{f"at_{e}": t for e, t in zip(LATENCY_EVENTS, times)}}

    def read(self) -> np.ndarray:
        """Iterates the rest of the reply; returns those packets' samples concatenated."""
        return np.concatenate([np.zeros(0, np.float32), *self])


class Conversation:
    """One user's spoken dialogue with an ``Engine``; the LLM KV cache carries over between turns.

    Args:
      engine: the loaded model.
      system_role: the system prompt (None: the chat template's own system line).
      max_len: LLM KV-cache slots (the whole conversation: system role, questions, answers).
      seed: text and speech sampling seed.
      warm_up: compile everything first (``Engine.warm_up``).
    """

    def __init__(self, engine: Engine, *, system_role: str | None = DEFAULT_ROLE, max_len: int = 4096,
                 seed: int = 0, warm_up: bool = True):
        if max_len > engine.cfg.llm.max_position_embeddings:
            raise FoJaxError(f"max_len {max_len} exceeds the LLM's max_position_embeddings "
                             f"({engine.cfg.llm.max_position_embeddings})")
        if warm_up:
            engine.warm_up(max_len, system_role)
        self.engine = engine
        self.template, system = engine.system(system_role)
        self.session = S.new_session(system, cfg=engine.cfg, batch=1, max_len=max_len)
        self.max_len, self.seed = max_len, seed
        self.turns = 0
        self.reply: Reply | None = None
        self.listen_seconds = 0.0  # compute time spent listening
        self.chunks_heard = 0
        self._fbank = FbankStreamState.zeros(1)
        self._pending = np.zeros(0, np.float32)
        self._key = jax.random.key(seed)
        self._steps = 0
        self._decided_at: float | None = None
        self._forced: list[int] | None = None
        self._speech_cap = engine.shapes.max_tokens

    @property
    def state(self) -> State:
        return State(int(np.asarray(self.session.state)[0]))

    @property
    def context_length(self) -> int:
        """LLM cache slots in use."""
        return int(np.asarray(self.session.cache.lengths)[0])

    def _check_idle(self) -> None:
        if self.reply is not None:
            raise FoJaxError("a reply is in progress: iterate it to the end or interrupt() it first")

    def listen(self, samples: np.ndarray, *, decide: bool = True) -> np.ndarray:
        """Feeds 16 kHz mono samples in [-1, 1]; each complete 160 ms chunk goes through the model.

        A chunk after the end of a turn (an answer, or the state head's 'stop listening') opens a new
        turn. With ``decide`` the state head may end the turn: listening stops at the deciding chunk
        (state SS: call ``respond``; the rest of ``samples`` waits for the next call).

        Returns:
          (C, 3) float32 state-head probabilities of the C chunks heard now.
        Raises:
          ContextFull: the turn no longer fits in ``max_len``.
        """
        self._check_idle()
        buf = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        probs, pos = [], 0
        while len(buf) - pos >= CHUNK_SAMPLES and self.state not in (State.SS, State.CS):
            probs.append(self._listen_chunk(buf[pos:pos + CHUNK_SAMPLES], decide))
            pos += CHUNK_SAMPLES
        self._pending = buf[pos:]
        return np.asarray(probs, np.float32).reshape(-1, 3)

    def _listen_chunk(self, chunk: np.ndarray, decide: bool) -> np.ndarray:
        start = time.perf_counter()
        if self.state == State.EL:  # no VAD here: the next chunk is new speech
            self.session = S.apply_event(self.session, Event.VAD_START)
        if self.state == State.SL:  # a turn starts with a fresh front end, as in the release's offline script
            self._fbank = FbankStreamState.zeros(1)
        self._fbank, frames = _fbank_chunk(self._fbank, jnp.asarray(chunk[None]))
        e = self.engine
        self.session, probs = S.listen(e.params, self.session, frames, decide_b=np.array([decide]), cfg=e.cfg,
                                       template=self.template)
        probs = np.asarray(probs)[0]
        if bool(np.asarray(self.session.overflow)[0]):
            raise ContextFull(f"the conversation filled the LLM context ({self.max_len} positions)")
        if self.state == State.SS:
            self._decided_at = time.perf_counter()
        self.listen_seconds += time.perf_counter() - start
        self.chunks_heard += 1
        return probs

    def respond(self, max_tokens: int | None = None, force_tokens: Sequence[int] | None = None,
                speech: bool = True) -> Reply:
        """Ends listening (the rest of a chunk is zero-padded and heard, as the release pads its input)
        unless the state head already chose to speak, and starts the answer of at most ``max_tokens``
        text tokens (default ``EngineOptions.max_answer_tokens``).

        ``force_tokens``: the answer's text tokens, fed instead of the sampled ones (the LLM still
        runs every step and its hidden states drive the speech decoder, as in the paper's
        output-speech evaluation); the answer ends after them. ``speech=False``: text only (the
        reply yields no audio; the speech-in -> text-out evaluation).

        Raises FoJaxError when nothing was heard or the state head dropped the turn.
        """
        self._check_idle()
        if self.state in (State.SL, State.CL) and len(self._pending):
            self._listen_chunk(np.pad(self._pending, (0, CHUNK_SAMPLES - len(self._pending))), decide=False)
            self._pending = np.zeros(0, np.float32)
        state = self.state
        if state == State.CL:
            self.session = S.apply_event(self.session, Event.END_OF_INPUT)
            self._decided_at = time.perf_counter()
        elif state != State.SS:
            raise FoJaxError("nothing to answer: no speech was heard in this turn" if state == State.SL else
                             "the state head ended this turn without an answer")
        limit = max_tokens or self.engine.options.max_answer_tokens
        if force_tokens is not None:
            limit = min(limit, len(force_tokens))
        self.reply = Reply(self, self._decided_at, limit, speech)
        self._forced = list(force_tokens) if force_tokens is not None else None
        return self.reply

    def ignore(self) -> None:
        """The turn being heard was not addressed to the assistant: drop it from the context, as the
        state head's "stop listening" does (the rest of a chunk is dropped too; the next ``listen``
        opens a new turn)."""
        self._check_idle()
        if self.state in (State.SL, State.CL):
            self.session = S.apply_event(self.session, Event.VAD_END)
        self._pending = np.zeros(0, np.float32)

    def interrupt(self) -> Reply | None:
        """Stops the reply in progress at once (text, speech decoding, vocoding) and returns it.

        The LLM context keeps its text up to ``Reply.spoken_tokens``; the next ``listen`` opens a
        new turn. From another thread: the reply stops at its next step; this call waits for it.
        """
        reply = self.reply
        if reply is None:
            return None
        reply._stop = True  # seen by a step running in another thread
        with reply._lock:
            if not reply._started:
                reply._started = True
                self._finish(reply, steps=0, answer_start=0)
            else:
                reply._gen.close()  # raises GeneratorExit at its yield; its finally cleans up
        return reply

    # ------------------------------------------------------------------------------- speaking

    def _speak_step(self, index: int | None = None) -> tuple[int, np.ndarray]:
        """One text step; ``index``: the answer token it samples (replaced by a forced token)."""
        e = self.engine
        keys = _step_keys(self._key, np.int32(self._steps))
        self._steps += 1
        self.session, token, hidden = S.speak(e.params, self.session, keys, cfg=e.cfg, template=self.template,
                                              sampling=e.options.sampling)
        token = int(np.asarray(token)[0])
        if self._forced is not None and index is not None and index < len(self._forced) and token >= 0:
            token = self._forced[index]  # fed by the next step, whatever was sampled
            sess = self.session
            self.session = sess.replace(last_token=_like([token], sess.last_token), state=_like([State.CS], sess.state))
        return token, np.asarray(hidden)[0]

    def _speak(self, reply: Reply) -> Iterator[np.ndarray]:
        """The reply's generator: text steps, segments, speech decoding, vocoding."""
        e = self.engine
        answer_start = self.context_length + len(self.template.speak_ids)
        steps, hiddens, seg = 0, [], None
        try:
            while not reply._stop and len(reply.token_ids) < reply.max_tokens:
                token, hidden = self._speak_step(len(reply.token_ids))
                steps += 1
                if token < 0:  # no room left in the cache
                    reply.context_full = True
                    break
                if token == self.template.end_id:
                    break
                reply.token_ids.append(token)
                hiddens.append(hidden)
                if not reply.speech:
                    continue
                if seg is None:  # the 'ss' step's token: held, its text is checked with the next one
                    seg = ts.start(0)
                    continue
                seg, segment = ts.push(seg, reply._decode(), len(hiddens) - 1, e.segmentation)
                if segment is None and len(seg.hidden_indices) >= e.options.max_segment_tokens:
                    seg, segment = ts.flush(seg)
                if segment is not None:
                    yield from self._vocode(reply, segment, hiddens)
            if seg is not None and not reply._stop:
                _, segment = ts.flush(seg)
                if segment is not None:
                    yield from self._vocode(reply, segment, hiddens)
        except GeneratorExit:
            reply._stop = True
            raise
        finally:
            self._finish(reply, steps, answer_start)

    def _vocode(self, reply: Reply, segment: ts.Segment, hiddens: list[np.ndarray]) -> Iterator[np.ndarray]:
        """One segment: speech-decoder prefill, AR tokens, streaming vocoder; yields PCM packets."""
        e, d = self.engine, self.engine.cfg.decoder
        part = SpokenSegment(segment.text, segment.tts_text, segment.hidden_indices[-1] + 1)
        reply.segments.append(part)
        ids = e.tokenizer.encode(part.tts_text, add_special_tokens=False)
        if ids:  # an empty segment (no text left after normalisation) has nothing to say
            reply._mark("first_text_chunk")
            seed = (self.seed * 1_000_003 + self.turns * 1_009 + len(reply.segments)) % 2 ** 31
            state = sd.start(e.decoder_params, d, e.embed_table[np.asarray(ids)],
                             np.stack([hiddens[i] for i in segment.hidden_indices]), max_tokens=self._speech_cap,
                             sampling=e.decoder_sampling, seed=seed, shapes=e.shapes)
            jax.block_until_ready(state.cache)
            reply._mark("decoder_prefill")

            def window(tokens: np.ndarray, trim: tuple[int, int]) -> np.ndarray:
                reply._mark("first_speech_chunk")
                return e.decode_window(tokens, trim)

            stream = start_segment(e.vocoder, reply.packets)  # first-packet settings until one left
            for token in sd.decode_tokens(e.decoder_params, d, state, max_tokens=self._speech_cap,
                                          sampling=e.decoder_sampling, shapes=e.shapes):
                if reply._stop:
                    return
                if token >= e.cfg.codec.n_codes:
                    part.skipped += 1
                    continue
                part.speech_token_ids.append(token)
                stream, packets = push_tokens(stream, [token], window, e.vocoder)
                for packet in packets:
                    yield self._emit(reply, part, packet)
            last = finish_segment(stream, window, e.vocoder)
            if last is not None:
                part.complete = True
                reply.spoken_tokens = part.end_token  # handed out with this packet
                yield self._emit(reply, part, last)
        part.complete = True
        reply.spoken_tokens = part.end_token

    def _emit(self, reply: Reply, part: SpokenSegment, packet: np.ndarray) -> np.ndarray:
        packet = trim_first_packet(packet, reply.packets, self.engine.vocoder)
        reply._mark("first_pcm")
        reply.packets += 1
        reply.samples += len(packet)
        part.samples += len(packet)
        return packet

    def _finish(self, reply: Reply, steps: int, answer_start: int) -> None:
        """Leaves the session ready for the next turn; on interruption, cuts the unspoken text."""
        try:
            if steps and not reply.context_full:
                keep = reply.spoken_tokens if reply._stop else len(reply.token_ids)
                if self.state in (State.SS, State.CS):  # text generation was cut (else it had ended)
                    if keep > steps - 1:  # the last kept token was sampled but not fed yet
                        self._speak_step()
                    self.session = S.apply_event(self.session, Event.INTERRUPTED)
                cache = self.session.cache
                self.session = self.session.replace(cache=cache.replace(lengths=_like([answer_start + keep],
                                                                                      cache.lengths)))
            elif self.state in (State.SS, State.CS):  # stopped before the first step, or no room left
                self.session = S.apply_event(self.session, Event.INTERRUPTED)
        finally:
            reply.interrupted, reply.finished = reply._stop, True
            self.reply, self._forced = None, None
            self.turns += 1
