"""``fo-jax toy``: the toy world end to end, resumable, with a report.

Runs the steps of ``fo_jax.toy.pipeline`` (a rerun skips finished steps and resumes an interrupted
one), then writes ``WORKDIR/report/report.md`` (+ ``report.json``, ``plots/``). Exit code 1 when
a step failed; targets that are missed are stated in the report, not in the exit code.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

from fo_jax.errors import FoJaxError

NEEDS = ("piper", "pocketsphinx", "espeakng_loader", "matplotlib")  # the `audio` extra


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("toy", help="train a small Freeze-Omni on the toy world end to end (resumable), report")
    p.add_argument("--workdir", default=None, help="output folder (default work/toy, or work/toy-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a small world and short training (CI smoke run)")
    p.add_argument("--seed", type=int, default=0, help="the world's seed (split, subsets, voices)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise FoJaxError(f"the toy world needs {', '.join(missing)}: pip install -e '.[audio]'")
    from fo_jax.toy import pipeline
    from fo_jax.toy.report import RunInfo, evaluate_targets, write_report
    from fo_jax.toy.steps import StepContext, run_steps, summary_table

    workdir = Path(args.workdir or ("work/toy-quick" if args.quick else "work/toy"))
    ctx = StepContext(workdir=workdir, quick=args.quick, seed=args.seed, progress=args.progress)
    started = time.perf_counter()
    outcomes = run_steps(pipeline.steps(), ctx)
    machine = {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    info = RunInfo(workdir, args.quick, outcomes, pipeline.final_checks(ctx), dict(pipeline.PENDING),
                   pipeline.BUDGET_S[args.quick], machine)
    paths = write_report(workdir / "report", info)
    print()
    print(summary_table(outcomes))
    print(f"this invocation: {time.perf_counter() - started:.0f} s")
    print()
    for row in evaluate_targets(info):
        print(f"{row['status']:8s} {row['target']}: {row['measured']} (target {row['threshold']})"
              + (f" -- {row['note']}" if row["note"] else ""))
    print(f"\nreport: {paths['markdown']}  (also {paths['json'].name}, plots/)")
    return 1 if any(o.status == "failed" for o in outcomes) else 0
