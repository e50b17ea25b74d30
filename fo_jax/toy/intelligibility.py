"""How well an independent recognizer (pocketsphinx) understands each toy-world voice.

``python -m fo_jax.toy.intelligibility [--n 30] [--workdir DIR]`` speaks ``n`` questions per
user voice family (round-robin over the family's voices) and ``n`` answers with the assistant
voice, and prints WER and sentence accuracy with pocketsphinx's general English LM and with a
bigram LM of the toy world's sentences. This tells which voices the final report's
independent-recognizer check can rely on.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from fo_jax.audio.io import load_audio
from fo_jax.toy.build import stratified_subset
from fo_jax.toy.synth import (ASSISTANT_RATE, ASSISTANT_VOICE, USER_RATE, USER_VOICES, recognize, synthesize_all,
                              wer, world_lm)
from fo_jax.toy.world import make_world, normalize


def measure(n: int, workdir: Path, seed: int = 0, progress: bool = True) -> dict:
    w = make_world(seed)
    pairs = stratified_subset(w.qa, n, random.Random(f"intelligibility/{seed}"))
    lm = world_lm(workdir / "toy_world.arpa", seed)
    families = defaultdict(list)
    for v in USER_VOICES:
        families[v.family].append(v)
    jobs = []  # (family, voice, text, rate)
    for family, voices in families.items():
        jobs += [(family, voices[i % len(voices)], p.question, USER_RATE) for i, p in enumerate(pairs)]
    jobs += [("assistant", ASSISTANT_VOICE, p.answer, ASSISTANT_RATE) for p in pairs]
    paths, _ = synthesize_all([(t, v, r) for _, v, t, r in jobs], workdir / "clips", progress)
    rows = defaultdict(lambda: defaultdict(list))  # group -> lm -> [(ref, hyp)]
    from tqdm import tqdm

    for (family, voice, text, _), path in tqdm(list(zip(jobs, paths)), desc="recognize", disable=not progress):
        audio, _ = load_audio(path, sample_rate=USER_RATE)
        for lm_name, lm_path in (("general", None), ("world", lm)):
            hyp = recognize(audio, lm=lm_path)
            for group in (family, f"{family}/{voice.name}"):
                rows[group][lm_name].append((text, hyp))
    out = {}
    for group, by_lm in rows.items():
        out[group] = {"n": len(by_lm["general"])}
        for lm_name, pairs_ in by_lm.items():
            refs, hyps = zip(*pairs_)
            out[group][lm_name] = {"wer": round(wer(list(refs), list(hyps)), 3),
                                   "sentence_acc": round(sum(normalize(r) == h for r, h in pairs_) / len(pairs_), 3)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30, help="sentences per voice family")
    p.add_argument("--workdir", default="work/toy/intelligibility")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    started = time.time()
    res = measure(args.n, Path(args.workdir), args.seed)
    print(f"{'voices':28s} {'n':>3s}  {'WER general':>11s} {'acc':>5s}  {'WER world-LM':>12s} {'acc':>5s}")
    for group in sorted(res, key=lambda g: (g.split("/")[0], "/" in g, g)):
        r = res[group]
        print(f"{group:28s} {r['n']:3d}  {r['general']['wer']:11.3f} {r['general']['sentence_acc']:5.2f}  "
              f"{r['world']['wer']:12.3f} {r['world']['sentence_acc']:5.2f}")
    print(json.dumps({"seconds": round(time.time() - started, 1)}))
    Path(args.workdir, "intelligibility.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
