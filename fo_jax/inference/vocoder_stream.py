"""Streaming vocoding of speech-decoder tokens into PCM packets, as the released server does it.

Per text segment (one run of the speech decoder):
- Tokens accumulate. When ``left + chunk + overlap`` are held (``left`` is 0 for the first window
  of the segment, ``overlap`` afterwards) the whole window is decoded, ``left`` tokens of audio are
  cut from the front and ``overlap`` from the back (600 samples a token), and the last
  ``2 * overlap`` tokens stay as the next window's left context + lookahead. So windows are
  ``chunk + overlap`` tokens, then ``overlap + chunk + overlap``, each emitting ``chunk`` tokens.
- Each emitted piece is cut at a quiet point (:func:`quiet_split`): everything before it leaves
  as a packet (after whatever was buffered), the rest is buffered; a piece with no quiet point is
  buffered whole.
- When the segment's tokens end, the remaining tokens are decoded (with their left context, no
  lookahead) and leave with the buffer as the last packet.

Across a reply (the server's ``decoder()`` calls): while no packet has been emitted yet a
segment uses the first-packet chunk (20) and threshold (0.1), later segments 40 and 0.015; the
very first packet of the reply loses its leading silence (up to the first |x| > 0.03), here
but for the last ``trim_keep_s`` before that sample (see ``VocoderStreamConfig``).

The decode function is injected: ``decode_window_fn(tokens_t, (left, right)) -> samples`` with
``tokens_t`` a (T,) int32 window and ``samples`` the audio of its tokens ``left .. T - right``:
600 * (T - left - right) floats at 24 kHz (any shape, e.g. (1, n)). The stream only keeps those
(the rest is context and lookahead), so a codec may skip the rest of the work: TiCodec's
``decode_chunk(..., trim=(left, right))`` does (``Engine.decode_window``). A decoder of whole
windows fits through :func:`slicing`. Full windows have fixed sizes and trims (server: 30 tokens
(0, 10), then 40 (10, 10) in the reply's first segment; 50 (0, 10), then 60 (10, 10) later); only a
segment's last call has a variable T (1 .. 59) and trim (left, 0), as in the release, which
decodes the tail unpadded (padding it would change its last samples: the codec is not causal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from fo_jax.errors import ConfigError

DecodeWindowFn = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


def slicing(decode_all: Callable[[np.ndarray], np.ndarray], samples_per_token: int = 600) -> DecodeWindowFn:
    """A ``DecodeWindowFn`` from a decoder of whole windows ((T,) -> 600 T samples): decodes, then cuts."""

    def decode(tokens: np.ndarray, trim: tuple[int, int]) -> np.ndarray:
        samples = np.asarray(decode_all(tokens)).reshape(-1)
        return samples[trim[0] * samples_per_token:samples.shape[0] - trim[1] * samples_per_token]

    return decode


@dataclasses.dataclass(frozen=True)
class VocoderStreamConfig:
    """Streaming settings; defaults are the release's server.json values.

    Attributes:
      first_chunk_size: tokens emitted per window while no packet has left (decoder_first_chunk_size).
      chunk_size: tokens emitted per window afterwards (decoder_chunk_size).
      overlap_size: left-context and lookahead tokens (decoder_chunk_overlap_size).
      seg_threshold_first_packet: quiet-point mean |x| threshold before the first packet.
      seg_threshold: quiet-point threshold afterwards (decoder_seg_threshold).
      window_n: quiet-point sliding-window length in samples (decoder_N).
      samples_per_token: codec upsampling (8 * 5 * 5 * 3).
      sample_rate: codec output rate in Hz.
      trim_leading_silence: drop the reply's first packet's samples before the first loud one.
      silence_level: |x| above which a sample counts as loud for that trim.
      trim_keep_s: seconds kept before the first loud sample. The release keeps none (0.0 gives its
        cut exactly); that cut drops unvoiced onsets, which stay below 0.03: measured on the toy
        world's forced answers, "Three ..." was heard as "We ..." and "Four ..." as "Work ...";
        keeping 0.1 s, 25 instead of 22 of 31 arithmetic answers were recognized.
    """

    first_chunk_size: int = 20
    chunk_size: int = 40
    overlap_size: int = 10
    seg_threshold_first_packet: float = 0.1
    seg_threshold: float = 0.015
    window_n: int = 2401
    samples_per_token: int = 600
    sample_rate: int = 24000
    trim_leading_silence: bool = True
    silence_level: float = 0.03
    trim_keep_s: float = 0.1

    def __post_init__(self):
        if self.trim_keep_s < 0:
            raise ConfigError(f"vocoder stream: trim_keep_s must be >= 0, got {self.trim_keep_s}")
        if self.overlap_size < 1:
            raise ConfigError(f"vocoder stream: overlap_size must be >= 1, got {self.overlap_size}")
        shortest = min(self.first_chunk_size, self.chunk_size) * self.samples_per_token
        if self.window_n < 1 or shortest < self.window_n:
            raise ConfigError(f"vocoder stream: window_n={self.window_n} must be in [1, {shortest}] "
                              "(samples emitted by the smallest chunk)")

    @classmethod
    def offline(cls) -> VocoderStreamConfig:
        """The release's offline script: chunk 40 from the start, threshold 0.01, no trim."""
        return cls(first_chunk_size=40, chunk_size=40, seg_threshold_first_packet=0.01,
                   seg_threshold=0.01, trim_leading_silence=False)


def quiet_split(samples: np.ndarray, window_n: int, threshold: float) -> int | None:
    """Where the release cuts a decoded piece, or None when it has no quiet enough stretch.

    The |x| sums of every ``window_n``-sample window starting at or after ``L // 2 - window_n // 2``
    are compared; the first smallest one, divided by ``window_n``, must be below ``threshold``. The
    cut is then the first sample of smallest |x| in ``[s, min(L, s + m + window_n))``, where ``s``
    is the best window's start and ``m`` its offset from the search start. (The release measures the
    range from the already-shifted start, so it reaches past the best window by ``m``; kept as is.)

    Args:
      samples: (L,) float audio, L >= window_n.
    Returns:
      cut index in (0, L), or None.
    """
    mag = np.abs(np.asarray(samples, np.float64))
    length = mag.shape[0]
    csum = np.concatenate([[0.0], np.cumsum(mag)])
    window_sums = csum[window_n:] - csum[:-window_n]  # (L - N + 1,), window starting at each sample
    search_start = length // 2 - window_n // 2
    offset = int(np.argmin(window_sums[search_start:]))
    if window_sums[search_start + offset] / window_n >= threshold:
        return None
    start = max(0, search_start + offset)
    end = min(length, start + offset + window_n)
    return start + int(np.argmin(mag[start:end]))


def trim_leading_silence(samples: np.ndarray, level: float, keep: int = 0) -> np.ndarray:
    """Drops samples before the first with |x| > level but its last ``keep``; a packet with none
    stays whole."""
    loud = np.flatnonzero(np.abs(samples) > level)
    return samples[max(0, loud[0] - keep):] if loud.size else samples


def trim_first_packet(packet: np.ndarray, packets_emitted: int, config: VocoderStreamConfig) -> np.ndarray:
    """The reply's first packet (``packets_emitted == 0``) without its leading silence; others as they are."""
    if packets_emitted == 0 and config.trim_leading_silence:
        return trim_leading_silence(packet, config.silence_level, round(config.trim_keep_s * config.sample_rate))
    return packet


@dataclasses.dataclass(frozen=True)
class SegmentStreamState:
    """Vocoding state of one text segment.

    Attributes:
      tokens: (n,) int32 tokens held: left context, new tokens, lookahead.
      left: tokens at the front of ``tokens`` whose audio already left (0 or overlap_size).
      buffer: (b,) float32 decoded samples not yet emitted.
      chunk_size: tokens emitted per full window in this segment.
      threshold: quiet-point threshold in this segment.
    """

    tokens: np.ndarray
    left: int
    buffer: np.ndarray
    chunk_size: int
    threshold: float


def start_segment(config: VocoderStreamConfig, packets_emitted: int) -> SegmentStreamState:
    """Fresh state for a segment; ``packets_emitted`` (in this reply) picks the first-packet settings."""
    first = packets_emitted == 0
    return SegmentStreamState(
        tokens=np.zeros((0,), np.int32), left=0, buffer=np.zeros((0,), np.float32),
        chunk_size=config.first_chunk_size if first else config.chunk_size,
        threshold=config.seg_threshold_first_packet if first else config.seg_threshold)


def _decode(decode_window_fn: DecodeWindowFn, tokens: np.ndarray, trim: tuple[int, int],
            config: VocoderStreamConfig) -> np.ndarray:
    samples = np.asarray(decode_window_fn(tokens, trim), np.float32).reshape(-1)
    kept = tokens.shape[0] - trim[0] - trim[1]
    if samples.shape[0] != kept * config.samples_per_token:
        raise ValueError(f"decode_window_fn returned {samples.shape[0]} samples for {kept} kept tokens "
                         f"(a {tokens.shape[0]}-token window, trim {trim}); expected {config.samples_per_token} "
                         "per token")
    return samples


def push_tokens(state: SegmentStreamState, tokens: Iterable[int] | np.ndarray, decode_window_fn: DecodeWindowFn,
                config: VocoderStreamConfig) -> tuple[SegmentStreamState, list[np.ndarray]]:
    """Adds speech tokens; decodes every window they complete.

    Returns:
      (new state, packets (each (p,) float32) ready to play, possibly none). The reply's first
      packet still needs :func:`trim_first_packet` (:func:`stream_vocode` does it).
    """
    new = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens, np.int32).reshape(-1)
    held, left, buffer = state.tokens, state.left, state.buffer
    pad = config.overlap_size
    packets = []
    while new.size:
        window = left + state.chunk_size + pad
        take = min(window - held.shape[0], new.shape[0])
        held, new = np.concatenate([held, new[:take]]), new[take:]
        if held.shape[0] < window:
            break
        piece = _decode(decode_window_fn, held, (left, pad), config)
        left, held = pad, held[-2 * pad:]
        cut = quiet_split(piece, config.window_n, state.threshold)
        if cut is None:
            buffer = np.concatenate([buffer, piece])
        else:
            packets.append(np.concatenate([buffer, piece[:cut]]))
            buffer = piece[cut:]
    return dataclasses.replace(state, tokens=held, left=left, buffer=buffer), packets


def finish_segment(state: SegmentStreamState, decode_window_fn: DecodeWindowFn,
                   config: VocoderStreamConfig) -> np.ndarray | None:
    """The segment's last packet: buffer + the held tokens' audio past the left context (None if no token)."""
    if state.tokens.shape[0] == 0:
        return None
    tail = _decode(decode_window_fn, state.tokens, (state.left, 0), config)
    return np.concatenate([state.buffer, tail])


def stream_vocode(tokens_iterable: Iterable[int | Iterable[int]], decode_window_fn: DecodeWindowFn,
                  config: VocoderStreamConfig = VocoderStreamConfig(), packets_emitted: int = 0
                  ) -> Iterator[np.ndarray]:
    """Vocodes one text segment as its tokens arrive; yields (p,) float32 PCM packets at 24 kHz.

    Args:
      tokens_iterable: speech tokens, one int or a batch of ints per item (e.g. per decode step).
      decode_window_fn: ((T,) int32 window, (left, right)) -> 600 (T - left - right) float samples.
      config: streaming settings.
      packets_emitted: packets this reply already emitted (0: first-packet settings and trim).
    """
    state = start_segment(config, packets_emitted)
    for item in tokens_iterable:
        state, packets = push_tokens(state, np.atleast_1d(np.asarray(item, np.int32)), decode_window_fn, config)
        for packet in packets:
            yield trim_first_packet(packet, packets_emitted, config)
            packets_emitted += 1
    last = finish_segment(state, decode_window_fn, config)
    if last is not None:
        yield trim_first_packet(last, packets_emitted, config)


def vocode_reply(segments: Iterable[Iterable[int | Iterable[int]]], decode_window_fn: DecodeWindowFn,
                 config: VocoderStreamConfig = VocoderStreamConfig()) -> Iterator[np.ndarray]:
    """Vocodes a whole reply: one token stream per text segment, settings switched as the server does."""
    emitted = 0
    for tokens in segments:
        for packet in stream_vocode(tokens, decode_window_fn, config, emitted):
            emitted += 1
            yield packet

