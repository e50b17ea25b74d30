"""``fo-jax prepare``: a folder of audio + transcripts -> a checked JSONL manifest.
``fo-jax prepare-codec``: a speech-out manifest -> the same with 40 Hz ``codec_tokens`` per utterance."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="scan audio + transcripts into a JSONL manifest (problems reported)")
    p.add_argument("--audio_dir", required=True, help="folder of audio; transcripts as <stem>.txt or *.trans.txt")
    p.add_argument("--out", required=True, help="manifest to write (audio paths are relative to it)")
    p.set_defaults(func=run)
    p = sub.add_parser("prepare-codec", help="precompute codec tokens of a manifest's audio (speech-out stages 2, 3)")
    p.add_argument("--manifest", required=True, help="JSONL manifest with 'audio' (e.g. speech_out.jsonl)")
    p.add_argument("--codec", required=True,
                   help="a `codec` training run directory, the release's codec directory (model.json + final.pt), "
                        "or a saved fast mel codec (codec.json, e.g. fo-jax toy's WORKDIR/codec_fast/codec)")
    p.add_argument("--out", required=True, help="manifest to write (records + 'codec_tokens')")
    p.add_argument("--policy", choices=["skip", "strict"], default="skip",
                   help="bad records: skip them (listed) or stop at the first")
    p.set_defaults(func=run_codec)


def run(args: argparse.Namespace) -> int:
    from fo_jax.data.prepare import prepare_folder

    records, problems = prepare_folder(args.audio_dir, args.out)
    for problem in problems:
        print(f"skipped {problem}")
    hours = sum(r["duration"] for r in records) / 3600
    print(f"{args.out}: {len(records)} utterances, {hours:.2f} h; {len(problems)} skipped")
    return 0


def run_codec(args: argparse.Namespace) -> int:
    from fo_jax.data.codec_tokens import TOKENS_FIELD, prepare_codec_tokens
    from fo_jax.training.stages.codec import load_speech_codec

    codec = load_speech_codec(args.codec)
    records, problems = prepare_codec_tokens(args.manifest, args.out, codec, policy=args.policy)
    for problem in problems:
        print(f"skipped {problem}")
    tokens = sum(len(r[TOKENS_FIELD]) for r in records)
    print(f"{args.out}: {len(records)} utterances, {tokens} codec tokens ({codec.token_rate:g} per second); "
          f"{len(problems)} skipped")
    return 0
