"""``fo-jax prepare``: a folder of audio + transcripts -> a checked JSONL manifest."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="scan audio + transcripts into a JSONL manifest (problems reported)")
    p.add_argument("--audio_dir", required=True, help="folder of audio; transcripts as <stem>.txt or *.trans.txt")
    p.add_argument("--out", required=True, help="manifest to write (audio paths are relative to it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fo_jax.data.prepare import prepare_folder

    records, problems = prepare_folder(args.audio_dir, args.out)
    for problem in problems:
        print(f"skipped {problem}")
    hours = sum(r["duration"] for r in records) / 3600
    print(f"{args.out}: {len(records)} utterances, {hours:.2f} h; {len(problems)} skipped")
    return 0
