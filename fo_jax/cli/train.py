"""``fo-jax train``: run a training stage from a run config, resuming from the work directory."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a stage (resumes from WORKDIR/checkpoints)")
    p.add_argument("--config", required=True, help="run config, e.g. configs/text_llm.py:tiny")
    p.add_argument("--workdir", help="checkpoints, metrics.jsonl (required unless --compile-only)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set stage.steps=100 (repeatable)")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many more steps")
    p.add_argument("--compile-only", action="store_true",
                   help="lower + compile the train step for the configured mesh and report per-device memory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fo_jax.config import load_config
    from fo_jax.errors import FoJaxError
    from fo_jax.training import trainer

    cfg = load_config(args.config, args.overrides)
    if args.compile_only:
        report = trainer.compile_only(cfg)
        print(json.dumps(report, indent=2))
        return 0
    if not args.workdir:
        raise FoJaxError("--workdir is required to train")
    summary = trainer.train(cfg, args.workdir, max_steps=args.max_steps)
    for line in summary["rejected"]:
        print(f"skipped {line}")
    state = "preempted, checkpoint saved" if summary["preempted"] else "done"
    print(f"step {summary['step']}: {state}; metrics {json.dumps(summary['metrics'])}")
    return 0
