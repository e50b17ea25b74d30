"""When the spoken reply is handed to the speech decoder, and how its text is cleaned first.

The released server accumulates, while the LLM speaks, the per-token hidden states and the new
decoded text, and sends both to the speech decoder as one *segment* when the newest text ends a
sentence. The rules, in the order the release applies them at each generated token:

1. The hidden state of the step is always appended (the first one comes from the ``ss`` step,
   before any text is checked: :func:`start`).
2. ``delta`` = the response text decoded so far minus the text seen at the last accepted step.
   If ``delta`` contains U+FFFD (a multi-byte character cut between tokens) the step stops here:
   its text is picked up, complete, by the next step.
3. ``delta`` is appended to the segment text.
4. Split points: sentence ends ``。 ： ？ ！ . ? !`` and newline; before the first segment has
   been sent, or once >= 20 hidden states are accumulated, also ``, ， :`` (this is the release's
   only guard against long segments: there is no forced split without punctuation).
5. Split when ``delta`` ends with a split point and >= 4 hidden states are accumulated, except a
   ``.`` whose preceding text (the previous step's decoded text) ends with a digit ("3." in lists
   and decimals does not split).
6. At the end of the reply whatever is left (hidden states, possibly no text) is sent.

The offline script (``bin/inference.py``) uses a simpler policy: sentence ends only, no minimum,
no U+FFFD check (:data:`OFFLINE_POLICY`).

Before re-tokenisation, the segment text goes through :func:`normalize_tts_text`.
"""

from __future__ import annotations

import dataclasses
import re

SENTENCE_ENDS = ("。", "：", "？", "！", ".", "?", "!", "\n")
CLAUSE_ENDS = (",", "，", ":")  # extra split points while no segment was sent, or on long segments
INCOMPLETE_CHAR = "\ufffd"


@dataclasses.dataclass(frozen=True)
class SegmentationPolicy:
    """Split rules (defaults: the release's server).

    Attributes:
      min_states: a split needs at least this many accumulated hidden states.
      clause_states: from this many accumulated hidden states on, clause ends split too; None: never.
      clauses_in_first_segment: clause ends split while no segment has been sent yet.
      wait_for_complete_chars: a step whose new text contains U+FFFD adds its hidden state only.
    """

    min_states: int = 4
    clause_states: int | None = 20
    clauses_in_first_segment: bool = True
    wait_for_complete_chars: bool = True


SERVER_POLICY = SegmentationPolicy()
# The server's rules without clause splits: for speech decoders trained on whole sentences
# (``server.json``'s ``text_clause_splits: 0``, our extension; the toy world's bundle).
SENTENCE_POLICY = SegmentationPolicy(clause_states=None, clauses_in_first_segment=False)
OFFLINE_POLICY = SegmentationPolicy(min_states=1, clause_states=None, clauses_in_first_segment=False,
                                    wait_for_complete_chars=False)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One unit of speech-decoder input.

    Attributes:
      text: raw response text of the segment (normalise with :func:`normalize_tts_text`).
      hidden_indices: caller-given ids of the LLM hidden states of the segment, in order.
      index: 0 for the first segment of the reply, then 1, 2, ...
      final: True for the leftover sent by :func:`flush`.
    """

    text: str
    hidden_indices: tuple[int, ...]
    index: int
    final: bool = False

    @property
    def tts_text(self) -> str:
        return normalize_tts_text(self.text)


@dataclasses.dataclass(frozen=True)
class SegmenterState:
    """Per-reply segmentation state.

    Attributes:
      text: text accumulated for the current segment.
      hidden_indices: hidden-state ids accumulated for the current segment.
      seen_text: decoded response text at the last accepted step (``delta`` is measured from it).
      segments_sent: segments returned so far.
    """

    text: str = ""
    hidden_indices: tuple[int, ...] = ()
    seen_text: str = ""
    segments_sent: int = 0


def start(first_hidden_index: int) -> SegmenterState:
    """State after the ``ss`` step: its hidden state (which produced the first token) is held."""
    return SegmenterState(hidden_indices=(first_hidden_index,))


def split_points(state: SegmenterState, policy: SegmentationPolicy = SERVER_POLICY) -> tuple[str, ...]:
    """Suffixes that end a segment now (``state`` already holds the current step's hidden state)."""
    first = policy.clauses_in_first_segment and state.segments_sent == 0
    long = policy.clause_states is not None and len(state.hidden_indices) >= policy.clause_states
    return SENTENCE_ENDS + CLAUSE_ENDS if first or long else SENTENCE_ENDS


def push(state: SegmenterState, decoded_text: str, hidden_index: int,
         policy: SegmentationPolicy = SERVER_POLICY) -> tuple[SegmenterState, Segment | None]:
    """Feeds one generated token (a ``cs`` step).

    Args:
      state: current state.
      decoded_text: the whole response decoded so far, this token included (as the release does:
        decoding the token list at once keeps multi-byte characters whole).
      hidden_index: id of the hidden state that produced this token.
      policy: split rules.
    Returns:
      (new state, the segment to send now or None).
    """
    state = dataclasses.replace(state, hidden_indices=state.hidden_indices + (hidden_index,))
    delta = decoded_text[len(state.seen_text):]
    if policy.wait_for_complete_chars and INCOMPLETE_CHAR in delta:
        return state, None
    state = dataclasses.replace(state, text=state.text + delta)
    ends = (delta.endswith(split_points(state, policy))
            and len(state.hidden_indices) >= policy.min_states
            and not (delta.endswith(".") and state.seen_text[-1:].isdigit()))
    segment = None
    if ends:
        segment = Segment(state.text, state.hidden_indices, state.segments_sent)
        state = dataclasses.replace(state, text="", hidden_indices=(), segments_sent=state.segments_sent + 1)
    return dataclasses.replace(state, seen_text=decoded_text), segment


def flush(state: SegmenterState) -> tuple[SegmenterState, Segment | None]:
    """End of the reply: sends what is left if any hidden state is held (the text may be empty)."""
    if not state.hidden_indices:
        return state, None
    segment = Segment(state.text, state.hidden_indices, state.segments_sent, final=True)
    return dataclasses.replace(state, text="", hidden_indices=(), segments_sent=state.segments_sent + 1), segment


# --- text normalisation before re-tokenisation ---------------------------------------------------

# One table: brackets and the enumeration comma become commas (full-width stays full-width);
# line breaks, tabs and markdown emphasis/code characters are dropped.
_CHAR_TABLE = str.maketrans({"、": "，", "(": ",", ")": ",", "（": "，", "）": "，",
                             "\n": None, "\r": None, "\t": None,
                             "*": None, "_": None, "`": None, "~": None})
_SPACE_AFTER_STOP = re.compile(r"([.:])\s+")
_CJK = re.compile(r"[\u4e00-\u9fa5]")
# "1. x" list markers; the number and the following character are consumed, as in the release
# ("1.2.b" -> "1:2.b" in non-CJK text, where any word character follows).
_LIST_MARK_CJK = re.compile(r"(\d+)\.\s*([\u4e00-\u9fa5A-Za-z])")
_LIST_MARK_OTHER = re.compile(r"(\d+)\.\s*(\w)")
_TERMINALS = "。？！.?!"
_SOFT_ENDS = ",，;；:：、"


def normalize_tts_text(text: str) -> str:
    """The release's clean-up of segment text before it is re-tokenised for the speech decoder.

    In order: map 、 ( ) （ ） to commas; drop newlines, tabs and ``* _ ` ~``; drop whitespace after
    ``.`` and ``:``; turn "N." list markers into "N：" (text with CJK characters, before a CJK or
    ASCII letter) or "N:" (otherwise, before any word character); end with 。 unless the text ends
    with 。？！.?! (a trailing comma, semicolon or colon is replaced). Empty text stays empty.
    """
    text = text.translate(_CHAR_TABLE)
    text = _SPACE_AFTER_STOP.sub(r"\1", text)
    if _CJK.search(text):
        text = _LIST_MARK_CJK.sub(r"\1：\2", text)
    else:
        text = _LIST_MARK_OTHER.sub(r"\1:\2", text)
    if text and text[-1] not in _TERMINALS:
        text = (text[:-1] if text[-1] in _SOFT_ENDS else text) + "。"
    return text
