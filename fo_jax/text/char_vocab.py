"""Character vocabulary for CTC targets (speech-in stage 1): id 0 is the CTC blank.

Text is normalised first (lower case; letters, digits, apostrophes and single spaces kept), so
punctuation and casing, which the audio does not carry, are not targets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

BLANK = "<blank>"


def normalize(text: str) -> str:
    text = re.sub(r"[^\w' ]+", " ", text.lower().replace("_", " "))
    return " ".join(text.split())


@dataclasses.dataclass(frozen=True)
class CharVocab:
    chars: tuple[str, ...]  # chars[0] is the blank

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharVocab":
        return cls((BLANK,) + tuple(sorted({c for t in texts for c in normalize(t)})))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharVocab":
        return cls(tuple(json.loads(Path(path).read_text())))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(list(self.chars), ensure_ascii=False))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the normalised text; characters outside the vocabulary are dropped."""
        index = {c: i for i, c in enumerate(self.chars)}
        return [index[c] for c in normalize(text) if c in index]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids if 0 < i < len(self.chars))
