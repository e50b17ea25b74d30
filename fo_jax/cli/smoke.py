"""``fo-jax smoke``: a short real job until the toy world exists.

Trains a tiny Qwen2 (tokenizer included) on spoken-style arithmetic Q&A in ChatML, saves it as a
HF Qwen2 directory, reloads it through the same loader users point at real checkpoints, and
answers held-out questions with the jitted generator. Prints accuracy on seen and held-out
questions; ``fo-jax generate --llm_path WORKDIR/llm --chat --prompt ...`` then talks to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def qa_pairs() -> list[tuple[str, str]]:
    """All 'what is a plus/minus b?' questions with one-digit operands and their answers."""
    pairs = []
    for a in range(10):
        for b in range(10):
            pairs.append((f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", f"{a} plus {b} is {a + b}."))
            if a >= b:
                pairs.append((f"What is {NUMBER_WORDS[a]} minus {NUMBER_WORDS[b]}?", f"{a} minus {b} is {a - b}."))
    return pairs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("smoke", help="train a tiny Qwen2 on arithmetic Q&A, save it in HF layout, generate")
    p.add_argument("--workdir", default="work/smoke", help="output directory (model in WORKDIR/llm)")
    p.add_argument("--config", default="configs/freeze_omni.py:tiny", help="run config (its model.llm dims)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    import flax.linen as nn
    from tqdm import tqdm

    from fo_jax.config import load_config, model_config
    from fo_jax.conversion.hf_qwen2 import load_hf_qwen2, save_hf_qwen2
    from fo_jax.errors import FoJaxError
    from fo_jax.inference.llm import generate
    from fo_jax.models.qwen2 import init_params
    from fo_jax.text.tokenizer import chatml, load_tokenizer, train_bpe_tokenizer
    from fo_jax.training import lm

    if args.steps < 1 or args.batch_size < 1:
        raise FoJaxError("--steps and --batch_size must be >= 1")
    workdir = Path(args.workdir)
    started = time.time()
    pairs = qa_pairs()
    random.Random(args.seed).shuffle(pairs)
    n_test = len(pairs) // 10
    test, train = pairs[:n_test], pairs[n_test:]

    def conversation(q: str, a: str | None = None) -> str:
        text = chatml([{"role": "user", "content": q}])
        return text if a is None else text + a + "<|im_end|>"

    tokenizer = train_bpe_tokenizer([conversation(q, a) for q, a in pairs], vocab_size=320)
    llm_cfg = model_config(load_config(args.config)).llm
    vocab = -(-len(tokenizer) // 64) * 64
    llm_cfg = dataclasses.replace(llm_cfg, vocab_size=vocab, eos_token_ids=(tokenizer.eos_token_id,),
                                  dtype="float32", param_dtype="float32")

    examples = []
    for q, a in train:
        prompt = tokenizer(conversation(q), add_special_tokens=False)["input_ids"]
        full = tokenizer(conversation(q, a), add_special_tokens=False)["input_ids"]
        examples.append((full, [0] * len(prompt) + [1] * (len(full) - len(prompt))))
    seq_len = max(len(ids) for ids, _ in examples)
    data = lm.batches(examples, args.batch_size, seq_len, args.seed)
    optimizer = lm.make_optimizer(args.lr, args.steps)
    params = nn.unbox(init_params(llm_cfg, jax.random.key(args.seed)))
    opt_state = optimizer.init(params)
    losses = []
    with tqdm(range(args.steps), desc="train tiny Qwen2", unit="step") as bar:
        for step in bar:
            tokens, mask = next(data)
            params, opt_state, loss = lm.train_step(params, opt_state, tokens, mask, cfg=llm_cfg,
                                                    optimizer=optimizer)
            if step % 50 == 0 or step == args.steps - 1:
                losses.append((step, float(loss)))
                bar.set_postfix(loss=f"{losses[-1][1]:.3f}")

    llm_dir = workdir / "llm"
    save_hf_qwen2(llm_dir, llm_cfg, jax.device_get(params))
    tokenizer.save_pretrained(llm_dir)
    # Reload through the user-facing loader, as `fo-jax generate --llm_path` does.
    cfg, loaded = load_hf_qwen2(llm_dir)
    tokenizer = load_tokenizer(llm_dir)

    def accuracy(split):
        prompts = [tokenizer(conversation(q), add_special_tokens=False)["input_ids"] for q, _ in split]
        outs = generate(loaded, cfg, prompts, max_new_tokens=16)
        answers = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
        return float(np.mean([ans == a for ans, (_, a) in zip(answers, split)])), answers

    train_acc, _ = accuracy(train[:len(test)])
    test_acc, test_answers = accuracy(test)
    report = {"steps": args.steps, "first_loss": losses[0][1], "final_loss": losses[-1][1],
              "train_accuracy": train_acc, "heldout_accuracy": test_acc,
              "examples": [{"question": q, "expected": a, "answer": ans}
                           for (q, a), ans in list(zip(test, test_answers))[:5]],
              "llm_path": str(llm_dir), "seconds": round(time.time() - started, 1)}
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    print(f"loss {report['first_loss']:.3f} -> {report['final_loss']:.3f}; exact-answer accuracy: "
          f"seen {train_acc:.0%}, held-out {test_acc:.0%} ({len(test)} questions); {report['seconds']} s")
    for ex in report["examples"][:3]:
        print(f"  Q: {ex['question']}  A: {ex['answer']!r}  (expected {ex['expected']!r})")
    print(f"model: {llm_dir}  report: {workdir / 'report.json'}")
    print(f'try: fo-jax generate --llm_path {llm_dir} --chat --top_k 1 --prompt "What is two plus five?"')
    return 0
