"""The toy LLM's stretched-reading probe: its prompts and its scoring."""

from __future__ import annotations

import pytest

from fo_jax.data.manifest import write_manifest
from fo_jax.text.tokenizer import IM_END, chatml, load_tokenizer, train_bpe_tokenizer
from fo_jax.toy import llm

QA = [("What is one plus two?", "One plus two is three."), ("What color is snow?", "Snow is white.")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyllm")
    texts = [chatml([{"role": "user", "content": p + q}, {"role": "assistant", "content": a}])
             for q, a in QA for p in ("", "Transcribe: ")]
    train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(root)
    return root


def test_stretched_prompt_repeats_only_the_stretched_text(hf_dir):
    tok = load_tokenizer(hf_dir)
    for q, _ in QA:
        plain = tok(chatml([{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
        assert llm.stretched_prompt(tok, "", q, 1) == plain
        transcribe = tok(chatml([{"role": "user", "content": "Transcribe: " + q}]), add_special_tokens=False)
        assert llm.stretched_prompt(tok, "Transcribe:", " " + q, 1) == transcribe["input_ids"]

        q_ids = tok(q, add_special_tokens=False)["input_ids"]
        got = llm.stretched_prompt(tok, "", q, 3)
        start = plain.index(q_ids[0])
        assert got[:start] == plain[:start]  # system turn and user header untouched
        assert got[start:start + 3 * len(q_ids)] == [i for i in q_ids for _ in range(3)]
        assert got[start + 3 * len(q_ids):] == plain[start + len(q_ids):]  # <|im_end|>, assistant header
        assert tok.decode(got[start + 3 * len(q_ids):]).startswith(IM_END)


def test_stretched_reading_scores_each_repeat_count(hf_dir, tmp_path, monkeypatch):
    records = [{"id": i, "category": "x", "messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]}
               for i, (q, a) in enumerate(QA)]
    write_manifest(tmp_path / "test.jsonl", records)
    tok = load_tokenizer(hf_dir)
    answer_of = {q: a for q, a in QA}

    def reader(_, prompts):  # a stand-in LLM that answers plain prompts and transcribes 2x-stretched ones
        out = []
        for ids in prompts:
            user = tok.decode(ids).split("<|im_start|>user\n")[1].split(IM_END)[0]
            if user.startswith("Transcribe:"):
                squeezed = [i for j, i in enumerate(ids) if j == 0 or i != ids[j - 1]]
                heard = tok.decode(squeezed).split("Transcribe:")[1].split(IM_END)[0]
                out.append(heard.strip() if len(ids) > len(squeezed) else "")
            else:
                out.append(answer_of.get(user, "I do not know."))
        return out

    monkeypatch.setattr(llm, "greedy_answers", reader)
    got = llm.stretched_reading(hf_dir, tmp_path / "test.jsonl", repeats=(1, 2))
    assert got == {"n": 2, "qa": {1: 1.0, 2: 0.0}, "transcribe": {1: 0.0, 2: 1.0}}
