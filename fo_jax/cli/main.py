"""``fo-jax``: one entry point, a subcommand per job.

User mistakes (missing files, bad configs or arguments) end with a one-line ``error: ...`` on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from fo_jax.errors import FoJaxError


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="text generation with the frozen LLM alone (the text-only ceiling)")
    p.add_argument("--llm_path", required=True, help="HF Qwen2 directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    p.add_argument("--system", default=None, help="system prompt for --chat (default: the model's template)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--top_k", type=int, default=5, help="1 = greedy; 0 = no top-k cut")
    p.add_argument("--top_p", type=float, default=0.8)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--json", action="store_true", help="print {prompt_ids, token_ids, text} as JSON")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import json

    from fo_jax.conversion.hf_qwen2 import load_hf_qwen2
    from fo_jax.inference.llm import generate
    from fo_jax.inference.sampling import SamplingConfig
    from fo_jax.text.tokenizer import load_tokenizer

    try:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except ValueError as e:
        raise FoJaxError(str(e)) from None
    if args.max_new_tokens < 1:
        raise FoJaxError("--max_new_tokens must be >= 1")
    tokenizer = load_tokenizer(args.llm_path)
    cfg, params = load_hf_qwen2(args.llm_path, dtype=args.dtype)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise FoJaxError("--prompt is empty after tokenisation")
    eos = set(cfg.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    ids = generate(params, cfg, [prompt_ids], args.max_new_tokens, sampling, args.seed, sorted(eos))[0]
    out_text = tokenizer.decode([i for i in ids if i not in eos], skip_special_tokens=False)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "token_ids": ids, "text": out_text}, ensure_ascii=False))
    else:
        print(out_text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fo-jax", description="Freeze-Omni in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    from fo_jax.cli import infer, prepare, smoke, toy, train

    infer.add_parser(sub)
    smoke.add_parser(sub)
    train.add_parser(sub)
    prepare.add_parser(sub)
    toy.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # transformers serves only tokenizers and configs here; its "PyTorch was not found" notice is noise.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    from fo_jax.runtime import enable_compilation_cache

    enable_compilation_cache()
    try:
        return args.func(args)
    except FoJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or a step that stopped on SIGTERM (its message says how to go on)
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
