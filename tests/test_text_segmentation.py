"""Segmentation of the spoken reply (release server / offline rules) and TTS text normalisation."""

import pytest

from fo_jax.inference import text_segmentation as ts


def run_reply(pieces, policy=ts.SERVER_POLICY, state=None):
    """Feeds token texts like the release: pieces[0] comes from the ``ss`` step (hidden 0), piece k
    from cs step k (hidden k) with the whole decoded text so far. Returns (text, hidden ids) pairs,
    the final flush marked with a trailing True."""
    state = state or ts.start(0)
    out = []
    for k in range(1, len(pieces)):
        state, seg = ts.push(state, "".join(pieces[:k + 1]), k, policy)
        if seg is not None:
            assert seg.index == len(out) and not seg.final
            out.append((seg.text, seg.hidden_indices))
    state, seg = ts.flush(state)
    if seg is not None:
        assert seg.final and seg.index == len(out)
        out.append((seg.text, seg.hidden_indices, True))
    return out


def test_first_token_text_joins_first_delta_and_min_four_states():
    # "Hi." reaches the split check with 2 states, "!" with 3: too few. The "." at step 4 has 5.
    assert run_reply(["Hi", ".", "!", " Ok", ".", " Bye", "."]) == [
        ("Hi.! Ok.", (0, 1, 2, 3, 4)),
        (" Bye.", (5, 6), True),
    ]


def test_clause_ends_split_only_the_first_segment():
    pieces = ["Well", ",", " yes", ",", " no", ",", " maybe", ",", " so", "."]
    assert run_reply(pieces) == [
        ("Well, yes,", (0, 1, 2, 3)),  # first segment: comma counts at 4 states
        (" no, maybe, so.", (4, 5, 6, 7, 8, 9)),  # later: commas ignored below 20 states
    ]


def test_clause_ends_count_from_twenty_states():
    first = ["A", "b", "c", "."]  # first segment: hidden 0..3
    # second segment: the comma at 19 states does not split, the one at 20 does.
    words = [" w"] * 18 + [",", ","] + [" y", "!"]
    out = run_reply(first + words)
    assert out[0] == ("Abc.", (0, 1, 2, 3))
    assert out[1] == ("".join(words[:20]), tuple(range(4, 24)))
    assert len(out[1][1]) == 20
    assert out[2] == (" y!", (24, 25), True)


def test_colons_fullwidth_always_ascii_only_as_clause():
    first = ["Go", "o", "d", "."]
    # after the first segment: ASCII ':' is a clause end (ignored), '：' a sentence end.
    out = run_reply(first + [" a", " b", " c", ":", " d", "：", " e"])
    assert out == [("Good.", (0, 1, 2, 3)), (" a b c: d：", (4, 5, 6, 7, 8, 9)), (" e", (10,), True)]


@pytest.mark.parametrize("end", ["。", "：", "？", "！", ".", "?", "!", "\n"])
def test_every_sentence_end_splits(end):
    out = run_reply(["Go", "o", "d", "."] + [" a", " b", " c", end, " z"])
    assert out[1] == (" a b c" + end, (4, 5, 6, 7))


def test_only_the_delta_suffix_counts():
    # '."' ends with a quote: no split, although a sentence end is inside the new text.
    out = run_reply(["Go", "o", "d", "."] + [" a", " b", " c", '."', " d", "."])
    assert out[1] == (' a b c." d.', (4, 5, 6, 7, 8, 9))


def test_digit_dot_does_not_split():
    first = ["Go", "o", "d", "."]
    # "3" then "." : previous text ends with a digit, no split; "4" then "。" splits.
    out = run_reply(first + [" Step", " ", "3", ".", " do", " it", "."])
    assert out[1] == (" Step 3. do it.", (4, 5, 6, 7, 8, 9, 10))
    out = run_reply(first + [" Step", " ", "4", "。", " z"])
    assert out[1] == (" Step 4。", (4, 5, 6, 7))
    # "3." arriving in one piece: the text before it ends with a space, so it splits.
    out = run_reply(first + [" Step", " x", " ", "3.", " z"])
    assert out[1] == (" Step x 3.", (4, 5, 6, 7))


def test_incomplete_character_waits_for_next_step():
    state = ts.start(0)
    state, seg = ts.push(state, "ab", 1)
    assert seg is None and state.text == "ab" and state.seen_text == "ab"
    state, seg = ts.push(state, "ab\ufffd", 2)  # half of a CJK character
    assert seg is None and state.text == "ab" and state.seen_text == "ab" and state.hidden_indices == (0, 1, 2)
    state, seg = ts.push(state, "ab好。", 3)  # completed: delta '好。', 4 states, splits
    assert seg == ts.Segment("ab好。", (0, 1, 2, 3), 0)
    assert state.text == "" and state.hidden_indices == () and state.seen_text == "ab好。"


def test_flush_sends_states_without_text_and_nothing_when_empty():
    state = ts.start(7)
    state, seg = ts.flush(state)
    assert seg == ts.Segment("", (7,), 0, final=True)
    state, seg = ts.flush(state)
    assert seg is None and state.segments_sent == 1


def test_offline_policy_sentences_only_no_minimum():
    pieces = ["Hi", ".", " a", ",", " b", ".", " 2", ".", " c", "!"]
    assert run_reply(pieces, ts.OFFLINE_POLICY) == [
        ("Hi.", (0, 1)),  # 2 states suffice
        (" a, b.", (2, 3, 4, 5)),  # commas never split
        (" 2. c!", (6, 7, 8, 9)),  # digit-dot exception holds offline too
    ]
    # no U+FFFD wait offline: the replacement character is kept in the text
    state, seg = ts.push(ts.start(0), "x\ufffd", 1, ts.OFFLINE_POLICY)
    assert state.text == "x\ufffd" and state.seen_text == "x\ufffd"


def test_split_points_sets():
    state = ts.SegmenterState(hidden_indices=tuple(range(19)), segments_sent=1)
    assert set(ts.split_points(state)) == set("。：？！.?!\n")
    assert set(ts.split_points(ts.SegmenterState(hidden_indices=tuple(range(20)), segments_sent=1))) == \
        set("。：？！.?!\n,，:")
    assert set(ts.split_points(ts.SegmenterState(segments_sent=0))) == set("。：？！.?!\n,，:")


@pytest.mark.parametrize("raw, clean", [
    ("你好、世界（测试）", "你好，世界，测试。"),  # brackets and 、 -> commas; trailing comma -> 。
    ("(a)", ",a。"),
    ("**Bold** and `code` x_y~", "Bold and code xy。"),
    ("line\none\r\tend!", "lineoneend!"),
    ("Hello.  World:  yes", "Hello.World:yes。"),  # whitespace after . and ASCII : is dropped
    ("时间： 八点", "时间： 八点。"),  # ...but not after a full-width colon
    ("1. apple\n2. banana", "1:apple2:banana。"),
    ("Pi is 3.14", "Pi is 3:14。"),  # non-CJK: any word character after "N." (release quirk)
    ("1.2.b", "1:2.b。"),  # the following character is consumed: second marker not matched
    ("圆周率3.14", "圆周率3.14。"),  # CJK text: only a CJK or ASCII letter after "N."
    ("步骤1. 打开2.Close", "步骤1：打开2：Close。"),
    ("Wait;", "Wait。"),
    ("好的：", "好的。"),
    ("Really?", "Really?"),
    ("结束！", "结束！"),
    ("", ""),
    ("\n*", ""),
])
def test_normalize_tts_text(raw, clean):
    assert ts.normalize_tts_text(raw) == clean


def test_segment_tts_text_is_normalised():
    assert ts.Segment("1. Go (now)\n", (0,), 0).tts_text == "1:Go ,now。"
