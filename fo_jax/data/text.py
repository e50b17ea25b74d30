"""Text examples for causal-LM training: ChatML conversations or plain text -> fixed-shape ids + masks."""

from __future__ import annotations

from typing import Any

import numpy as np

from fo_jax.text.tokenizer import DEFAULT_SYSTEM, chatml

ASSISTANT_HEADER = chatml([], add_generation_prompt=True, default_system=None)  # "<|im_start|>assistant\n"


def encode_record(record: dict[str, Any], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """A manifest record -> {'tokens': (T,) int32, 'mask': (T,) float32}, right-padded / truncated.

    ``{"messages": [...]}``: ChatML (the default system turn added when there is none); only the
    assistant turns' content and closing ``<|im_end|>`` are targets. ``{"text": "..."}``: every
    token is a target.
    """
    if "messages" in record:
        turns = list(record["messages"])
        if turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
        pieces = []
        for turn in turns:
            text = chatml([turn], add_generation_prompt=False, default_system=None)
            if turn["role"] == "assistant":
                pieces += [(ASSISTANT_HEADER, 0.0), (text[len(ASSISTANT_HEADER):-1], 1.0), ("\n", 0.0)]
            else:
                pieces.append((text, 0.0))
        ids, mask = [], []
        for text, weight in pieces:
            piece_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            mask += [weight] * len(piece_ids)
    else:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        mask = [1.0] * len(ids)
    tokens = np.zeros(seq_len, np.int32)
    weights = np.zeros(seq_len, np.float32)
    n = min(len(ids), seq_len)
    tokens[:n], weights[:n] = ids[:n], mask[:n]
    return {"tokens": tokens, "mask": weights}
