"""How well a toy world's frozen LLM reads stretched input (``fo_jax.toy.llm.stretched_reading``).

Speech reaches the LLM at 12.5 Hz, about three embeddings per word piece of a question; a text LLM
trained on one token per piece may not read that. This prints, for each repeat count k, the LLM's
exact-answer accuracy on the held-out test questions with every question token standing k times,
and how often it transcribes the stretched question exactly ("Transcribe:" + question, speech-in
2's task). Compare two workdirs' LLMs (with and without ``stage.stretch_prob``) side by side.

Usage:
  .venv/bin/python benchmarks/toy_llm_stretch.py WORKDIR [WORKDIR ...] [--repeats 1 2 3 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path, help="fo-jax toy workdirs (their llm/hf and test split)")
    parser.add_argument("--repeats", nargs="+", type=int, default=[1, 2, 3, 4])
    args = parser.parse_args()
    from fo_jax.toy.llm import stretched_reading

    rows = []
    for wd in args.workdirs:
        hf, test = wd / "llm" / "hf", wd / "data" / "manifests" / "text_test.jsonl"
        if not (hf / "config.json").exists() or not test.exists():
            print(f"error: {wd} has no trained toy LLM ({hf}) or test split ({test}); run `fo-jax toy` first",
                  file=sys.stderr)
            return 2
        rows.append((wd, stretched_reading(hf, test, args.repeats)))
    print("| workdir | n | " + " | ".join(f"QA k={k}" for k in args.repeats) + " | "
          + " | ".join(f"transcribe k={k}" for k in args.repeats) + " |")
    print("|---|---|" + "---|" * (2 * len(args.repeats)))
    for wd, r in rows:
        cells = [f"{100 * r['qa'][k]:.1f} %" for k in args.repeats]
        cells += [f"{100 * r['transcribe'][k]:.1f} %" for k in args.repeats]
        print(f"| {wd} | {r['n']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
