"""CTC target vocabulary (speech-in stage 1): characters or word pieces; id 0 is the CTC blank.

Text is normalised first (lower case; letters, digits, apostrophes and single spaces kept), so
punctuation and casing, which the audio does not carry, are not targets.

Two kinds, told apart by their units (so a run's meta, the unit list, is all a decoder needs):
- characters (``size=0``): one unit per character, the space included;
- word pieces (``size=N``): N units learned by byte-pair merges over the training transcripts'
  words, each word marked by a leading ``WORD`` ("▁what", "▁mex", "ico"), encoded by greedy
  longest match (no merge table). The release's CTC head has 5538 units (not released); on the
  toy world's small data, pieces spare the encoder spelling every word letter by letter
  (configs/speech_in_stage1.py has the measurements).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Sequence

BLANK = "<blank>"
WORD = "\u2581"  # starts a word (a normalised text never holds it: it is not a word character)


def normalize(text: str) -> str:
    text = re.sub(r"[^\w' ]+", " ", text.lower().replace("_", " "))
    return " ".join(text.split())


def learn_pieces(texts: Iterable[str], size: int) -> tuple[str, ...]:
    """``size`` word pieces (fewer if the words run out) of normalised ``texts``: byte-pair merges
    by the ``tokenizers`` BPE trainer (fast at corpus scale), every word starting with ``WORD``.
    Units in the trainer's order: the characters (``WORD`` included), then the merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD, prepend_scheme="always")
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, show_progress=False))
    vocab = bpe.get_vocab()
    return tuple(sorted(vocab, key=vocab.get))


@dataclasses.dataclass(frozen=True)
class CtcVocab:
    """``units[0]`` is the blank; the rest are characters or word pieces (see the module doc)."""
    units: tuple[str, ...]

    @classmethod
    def from_texts(cls, texts: Iterable[str], size: int = 0) -> "CtcVocab":
        """Characters of ``texts`` (size 0) or ``size`` units in all, blank included, of word pieces."""
        texts = [normalize(t) for t in texts]
        chars = sorted({c for t in texts for c in t})
        if size < 0 or 0 < size <= len(chars) + 1:
            raise ValueError(f"{size} CTC units: use 0 (characters) or more than the transcripts' "
                             f"{len(chars)} characters + the blank, e.g. {max(256, 4 * len(chars))}")
        if size == 0:
            return cls((BLANK,) + tuple(chars))
        return cls((BLANK,) + learn_pieces(texts, size - 1))

    @functools.cached_property
    def word_pieces(self) -> bool:
        return WORD in self.units

    def __len__(self) -> int:
        return len(self.units)

    @functools.cached_property
    def _index(self) -> dict[str, int]:  # built once: encode runs for every record of a corpus
        return {u: i for i, u in enumerate(self.units) if i}

    @functools.cached_property
    def _longest(self) -> int:
        return max(map(len, self._index))

    def encode(self, text: str) -> list[int]:
        """Ids of the normalised text; characters outside the vocabulary are dropped."""
        index = self._index
        if not self.word_pieces:
            return [index[c] for c in normalize(text) if c in index]
        ids = []
        for word in normalize(text).split():
            s, i = WORD + word, 0
            while i < len(s):
                for j in range(min(len(s), i + self._longest), i, -1):  # the longest unit that matches here
                    if s[i:j] in index:
                        ids.append(index[s[i:j]])
                        i = j
                        break
                else:
                    i += 1  # an unknown character
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.units[i] for i in ids if 0 < i < len(self.units))
        return " ".join(text.replace(WORD, " ").split()) if self.word_pieces else text
