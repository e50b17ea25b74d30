"""Toy-world speech: many user voices, one assistant voice, a content-hash cache, and a recognizer.

User speech is 16 kHz (the encoder's rate) from nine voices: Piper "joe" at several speeds and
noise settings, and espeak-ng male/female variants at several rates and pitches. The assistant
speaks with ONE fixed voice (Piper joe, noise off, so deterministic) at 24 kHz, the codec's rate.
A user clip ends on a whole 160 ms chunk, at least ``END_PAUSE`` after its speech (``end_on_chunk``).

Every clip is cached at ``<cache>/<key[:2]>/<key>.wav`` where ``key`` hashes (engine, voice
settings, text, rate): a rerun, or another manifest that needs the same clip, reuses the file.
Files are written to a temporary name and renamed, so an interrupted run leaves no broken clip.
The user Piper voices sample noise (per call), so their clips differ from run to run; espeak-ng
clips are the same in every build (``fo_jax.testing.speech.espeak`` reseeds its breath noise per
call), so the quick world, whose user voices are all espeak-ng, is the same on every run; the
assistant voice is deterministic.

``recognize`` runs pocketsphinx (an independent recognizer, not trained on anything of ours) on
16 kHz audio, with its general English LM or an ARPA LM from ``write_arpa``; ``wer`` scores it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from fo_jax.audio.fbank import CHUNK_SECONDS
from fo_jax.toy.world import make_world, normalize

USER_RATE, ASSISTANT_RATE = 16000, 24000
CACHE_VERSION = 1  # bump when synthesis changes in a way the key does not capture
# A user clip ends on a 160 ms chunk boundary at least this long after its speech (``end_on_chunk``).
END_PAUSE = 0.16


@dataclasses.dataclass(frozen=True)
class Voice:
    """A TTS engine with fixed settings (keyword arguments of fo_jax.testing.speech.<engine>)."""
    name: str
    family: str
    engine: str
    params: tuple[tuple[str, float | str], ...]

    @property
    def kwargs(self) -> dict:
        return dict(self.params)


def _piper(name: str, length: float, noise: float, noise_w: float, family: str = "piper") -> Voice:
    return Voice(name, family, "piper", (("length_scale", length), ("noise_scale", noise), ("noise_w_scale", noise_w)))


def _espeak(name: str, family: str, voice: str, rate: int, pitch: int) -> Voice:
    return Voice(name, family, "espeak", (("voice", voice), ("rate", rate), ("pitch", pitch)))


USER_VOICES = (
    _piper("joe-fast", 0.85, 0.667, 0.8),
    _piper("joe", 1.0, 0.667, 0.8),
    _piper("joe-slow", 1.2, 0.5, 0.6),
    _piper("joe-lively", 1.05, 0.9, 1.0),
    _espeak("espeak-us", "espeak-m", "en-us", 165, 50),
    _espeak("espeak-m7-low", "espeak-m", "en-us+m7", 150, 35),
    _espeak("espeak-m3-quick", "espeak-m", "en-us+m3", 190, 55),
    _espeak("espeak-f3", "espeak-f", "en-us+f3", 170, 65),
    _espeak("espeak-f2-slow", "espeak-f", "en-us+f2", 140, 75),
)
ESPEAK_USER_VOICES = tuple(v for v in USER_VOICES if v.engine == "espeak")  # ~30x cheaper than Piper
ASSISTANT_VOICE = _piper("assistant", 1.0, 0.0, 0.0, family="assistant")


def voices_for(text: str, seed: int, count: int, pool: Sequence[Voice] = USER_VOICES) -> list[Voice]:
    """``count`` distinct voices of ``pool`` for one utterance, chosen by (seed, text) alone.

    Depending on nothing else keeps a clip's voice stable when the selection of utterances
    changes (a larger build reuses a smaller one's clips), and ``voices_for(.., k)`` is a prefix
    of ``voices_for(.., k + 1)``.
    """
    count = min(count, len(pool))
    digest = hashlib.sha256(f"{seed}/{text}".encode()).digest()
    order = sorted(range(len(pool)), key=lambda i: hashlib.sha256(digest + pool[i].name.encode()).digest())
    return [pool[i] for i in order[:count]]


def clip_path(cache_dir: str | os.PathLike, text: str, voice: Voice, rate: int) -> Path:
    ending = [["end_pause", END_PAUSE]] if rate == USER_RATE else []  # user clips: end_on_chunk
    key = json.dumps([CACHE_VERSION, voice.engine, voice.params, text, rate] + ending)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(cache_dir) / digest[:2] / f"{digest}.wav"


def render(text: str, voice: Voice, rate: int) -> np.ndarray:
    """(N,) float32 speech at ``rate``; peaks above 0.99 (resampling overshoot) are scaled down.
    User clips (``USER_RATE``) end as ``end_on_chunk`` says."""
    from fo_jax.testing.speech import synthesize

    audio = synthesize(text, voice.engine, rate, **voice.kwargs)
    if audio.size == 0:
        raise RuntimeError(f"{voice.name} produced no audio for {text!r}")
    peak = float(np.abs(audio).max())
    audio = audio * (0.99 / peak) if peak > 0.99 else audio
    return end_on_chunk(audio, rate) if rate == USER_RATE else audio


def end_on_chunk(audio: np.ndarray, rate: int = USER_RATE, pause: float = END_PAUSE) -> np.ndarray:
    """``audio`` cut or zero-padded to the first whole 160 ms chunk ending ``pause`` s or more after
    its speech (``speech_end``).

    Why: the state head is trained and scored on a turn's last chunk. The TTS voices leave 0-400 ms
    after the last word, so a last chunk could end 10 ms after the speech, where nothing tells an
    ending from a pause between words (6 of a full run's 8 wrong final chunks; the same model with
    >= 100 ms there: 84 of 86 right). With the default the last chunk ends 160-320 ms after the
    speech: the paper's endpoint delay (1-2 chunks). Whole chunks also make training's chunk count
    (from fbank frames) and streaming's (from samples) agree.
    """
    chunk = round(CHUNK_SECONDS * rate)  # samples
    n = -(-int(round((speech_end(audio, rate) + pause) * rate)) // chunk) * chunk
    return np.pad(audio[:n], (0, max(0, n - len(audio)))).astype(np.float32)


def synthesize_all(jobs: Iterable[tuple[str, Voice, int]], cache_dir: str | os.PathLike,
                   progress: bool = True, desc: str = "tts") -> tuple[list[Path], int]:
    """Makes sure a clip exists for each (text, voice, rate); returns (paths, number synthesized)."""
    from tqdm import tqdm

    from fo_jax.audio.io import write_wav

    jobs = list(jobs)
    paths = [clip_path(cache_dir, t, v, r) for t, v, r in jobs]
    todo = {p: j for p, j in zip(paths, jobs) if not p.exists()}
    for path, (text, voice, rate) in tqdm(todo.items(), desc=desc, unit="clip", disable=not progress or not todo):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.wav")
        write_wav(tmp, render(text, voice, rate), rate)
        os.replace(tmp, path)
    return paths, len(todo)


def speech_end(audio: np.ndarray, rate: int, threshold: float = 0.02) -> float:
    """Seconds to the end of the last 10 ms frame whose RMS exceeds ``threshold`` x the loudest frame's."""
    hop = rate // 100
    frames = audio[: len(audio) // hop * hop].astype(np.float64).reshape(-1, hop)
    rms = np.sqrt((frames ** 2).mean(1))
    loud = np.flatnonzero(rms > threshold * rms.max()) if rms.size and rms.max() > 0 else []
    return round((int(loud[-1]) + 1) * hop / rate, 3) if len(loud) else 0.0


# --- independent recognizer ---------------------------------------------------------------------

def _cmudict() -> Path:
    from pocketsphinx import get_model_path

    return Path(get_model_path()) / "en-us" / "cmudict-en-us.dict"


@functools.cache
def _decoder(lm: str | None):
    from pocketsphinx import Decoder

    # The ARPA LM's own small dictionary: with the full cmudict, loading takes ~20 s instead of 0.05 s.
    kwargs = {"lm": lm, "dict": str(Path(lm).with_suffix(".dict"))} if lm else {}
    return Decoder(samprate=USER_RATE, logfn=os.devnull, **kwargs)


def recognize(pcm16k: np.ndarray, lm: str | os.PathLike | None = None) -> str:
    """pocketsphinx transcript (normalized words) of (N,) 16 kHz audio, float in [-1, 1] or int16.

    ``lm``: an ARPA language model with its ``.dict`` beside it (``write_arpa``); None uses
    pocketsphinx's general English LM and dictionary.
    """
    pcm = np.asarray(pcm16k)
    if pcm.dtype != np.int16:
        pcm = np.clip(np.round(pcm.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)
    dec = _decoder(str(lm) if lm else None)
    dec.start_utt()
    dec.process_raw(pcm.tobytes(), full_utt=True)
    dec.end_utt()
    hyp = dec.hyp()
    return normalize(hyp.hypstr) if hyp is not None else ""


def write_arpa(sentences: Iterable[str], path: str | os.PathLike, discount: float = 0.5) -> Path:
    """A bigram ARPA LM of ``sentences`` (absolute discounting, back-off to unigrams) at ``path``,
    and its pronunciations from pocketsphinx's cmudict at ``path`` with suffix ``.dict``.

    A domain LM for the recognizer: the toy world's vocabulary and phrasing, without the exact
    sentences being the only possible outputs (unlike a grammar).
    """
    uni, bi = Counter(), Counter()
    for s in sentences:
        words = ["<s>"] + normalize(s).split() + ["</s>"]
        uni.update(words)
        bi.update(zip(words, words[1:]))
    total = sum(c for w, c in uni.items() if w != "<s>")
    followers: dict[str, list[str]] = {}
    for h, w in bi:
        followers.setdefault(h, []).append(w)
    p_uni = {w: (c / total if w != "<s>" else 0.0) for w, c in uni.items()}
    lines_uni = []
    for w in sorted(uni):
        logp = f"{math.log10(p_uni[w]):.6f}" if p_uni[w] > 0 else "-99"
        if w in followers:  # back-off weight: discounted mass over the unseen followers' unigram mass
            seen = followers[w]
            alpha = (discount * len(seen) / uni[w]) / max(1e-12, 1.0 - sum(p_uni[v] for v in seen))
            lines_uni.append(f"{logp}\t{w}\t{math.log10(alpha):.6f}")
        else:
            lines_uni.append(f"{logp}\t{w}")
    lines_bi = [f"{math.log10((c - discount) / uni[h]):.6f}\t{h} {w}" for (h, w), c in sorted(bi.items())]
    text = ["", "\\data\\", f"ngram 1={len(lines_uni)}", f"ngram 2={len(lines_bi)}", "", "\\1-grams:",
            *lines_uni, "", "\\2-grams:", *lines_bi, "", "\\end\\", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text), encoding="utf-8")
    with open(_cmudict(), encoding="utf-8") as f:  # entries look like "word P H" or "word(2) P H"
        prons = [line for line in f if line.split(maxsplit=1)[0].split("(")[0] in uni]
    path.with_suffix(".dict").write_text("".join(prons), encoding="utf-8")
    return path


def world_lm(path: str | os.PathLike, seed: int = 0) -> Path:
    """The recognizer's domain LM (``write_arpa``) of every sentence of the world: questions,
    answers, asides and read sentences."""
    w = make_world(seed)
    return write_arpa([p.question for p in w.qa] + [p.answer for p in w.qa] + [a.text for a in w.asides]
                      + list(w.read), path)


def _words(x: str | Sequence[str]) -> list[str]:
    return normalize(x).split() if isinstance(x, str) else [w for s in x for w in normalize(s).split()]


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two word lists (substitutions, insertions, deletions cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(ref: str | Sequence[str], hyp: str | Sequence[str]) -> float:
    """Word error rate after ``normalize``: one sentence each, or two parallel lists (corpus WER =
    total edits / total reference words). An empty reference gives 0 for an empty hypothesis, else 1."""
    if isinstance(ref, str) != isinstance(hyp, str):
        raise TypeError("wer() takes two strings or two sequences of strings")
    pairs = [(ref, hyp)] if isinstance(ref, str) else list(zip(ref, hyp, strict=True))
    edits = sum(edit_distance(_words(r), _words(h)) for r, h in pairs)
    words = sum(len(_words(r)) for r, _ in pairs)
    return edits / words if words else float(edits > 0)
