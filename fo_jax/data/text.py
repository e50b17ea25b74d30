"""Text examples for causal-LM training: ChatML conversations or plain text -> fixed-shape ids + masks."""

from __future__ import annotations

from typing import Any

import numpy as np

from fo_jax.text.tokenizer import DEFAULT_SYSTEM, IM_END, chatml

ASSISTANT_HEADER = chatml([], add_generation_prompt=True, default_system=None)  # "<|im_start|>assistant\n"


def encode_record(record: dict[str, Any], tokenizer, seq_len: int, stretch: tuple[float, int] = (0.0, 1),
                  rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """A manifest record -> {'tokens': (T,) int32, 'mask': (T,) float32}, right-padded / truncated.

    ``{"messages": [...]}``: ChatML (the default system turn added when there is none); only the
    assistant turns' content and closing ``<|im_end|>`` are targets. ``{"text": "..."}``: every
    token is a target.

    ``stretch = (prob, max_repeat)``: with probability ``prob`` (drawn from ``rng``) the user turns'
    content tokens are each repeated 1..max_repeat times (uniform), the way speech embeddings
    stand several to a word piece; kept unstretched when the stretched record would not fit.
    """
    prob, max_repeat = stretch
    if "messages" in record:
        turns = list(record["messages"])
        if turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
        pieces = []  # (text, target weight, stretchable)
        for turn in turns:
            text = chatml([turn], add_generation_prompt=False, default_system=None)
            if turn["role"] in ("assistant", "user"):
                header = text[:text.index("\n") + 1]  # "<|im_start|>{role}\n"
                content = text[len(header):-len(IM_END) - 1]
                weight = float(turn["role"] == "assistant")
                pieces += [(header, 0.0, False), (content, weight, turn["role"] == "user"),
                           (IM_END, weight, False), ("\n", 0.0, False)]
            else:
                pieces.append((text, 0.0, False))
        encoded = [(tokenizer(text, add_special_tokens=False)["input_ids"], w, st) for text, w, st in pieces]
        repeats = None
        if prob > 0 and max_repeat > 1 and rng is not None and rng.random() < prob:
            repeats = [rng.integers(1, max_repeat + 1, len(piece_ids)) if st else np.ones(len(piece_ids), int)
                       for piece_ids, _, st in encoded]
            if sum(int(r.sum()) for r in repeats) > seq_len:
                repeats = None
        ids, mask = [], []
        for i, (piece_ids, weight, _) in enumerate(encoded):
            if repeats is not None:
                piece_ids = np.repeat(piece_ids, repeats[i]).tolist()
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
