"""A resumable pipeline of named steps: rerunning it continues where it stopped.

A ``Step`` has a name, a function ``run(ctx) -> result`` (a JSON-able dict) and a description of
its inputs. Its *key* hashes its ``version``, its ``inputs(ctx)`` and the keys of the steps it
comes ``after``, so a step reruns exactly when something it depends on changed, and a rerun
upstream (with new inputs) reruns everything downstream of it.

State lives in ``WORKDIR/steps/<name>.json``: ``{"key", "state": "running" | "done", "result",
"seconds", "cpu_seconds"}``. A step whose record is ``done`` with the current key is skipped
(its result is reused). A step found ``running`` with the same key was interrupted: it runs again
in its existing folder ``WORKDIR/<name>`` (training resumes from its checkpoints). A key that
changed clears that folder first (``clean=False`` keeps it, for content-addressed caches).

A step that raises is recorded as failed (traceback in ``steps/<name>.error.txt``), the steps
after it are not run, independent ones still are; ``run_steps`` returns every step's outcome. A
step that raises ``Interrupted`` (it stopped on request after saving its progress) stops the whole
run and stays ``running``, so the next run resumes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

STATE_DIR = "steps"


class Interrupted(KeyboardInterrupt):
    """A step stopped on request (SIGTERM, preemption) after saving its progress: not a failure.

    Like Ctrl-C it ends the run with the step's record left ``running``; a rerun resumes it.
    """


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a step's functions see.

    Attributes:
      workdir: the pipeline's root folder.
      quick: the --quick run (smaller data, fewer steps).
      seed: the world's seed.
      progress: show progress bars.
      results: results of the steps finished so far, by name.
    """
    workdir: Path
    quick: bool
    seed: int = 0
    progress: bool = True
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def dir(self, name: str) -> Path:
        """A step's own output folder, ``WORKDIR/<name>``."""
        return self.workdir / name


@dataclasses.dataclass(frozen=True)
class Step:
    """One named, cached unit of work.

    Attributes:
      name: unique; also the name of its output folder.
      run: (ctx) -> JSON-able result; writes its files under ``ctx.dir(name)``.
      inputs: (ctx) -> JSON-able description of everything else its outputs depend on (sizes,
        hyper-parameters); part of the key.
      after: steps it needs (their results are in ``ctx.results``; their keys are part of its key).
      version: bump when the step's code changes what it produces.
      clean: clear the output folder when the key changed (False for content-addressed caches).
      title: one line for progress and the summary.
    """
    name: str
    run: Callable[[StepContext], dict[str, Any]]
    inputs: Callable[[StepContext], dict[str, Any]] = lambda ctx: {}
    after: tuple[str, ...] = ()
    version: int = 1
    clean: bool = True
    title: str = ""


@dataclasses.dataclass
class Outcome:
    """What happened to one step in this run: ``status`` is done, cached, failed or blocked."""
    name: str
    status: str
    title: str = ""
    result: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    error: str = ""


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: an interrupted write leaves the previous record


def read_state(workdir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The stored record of step ``name`` (None if it never started)."""
    path = Path(workdir) / STATE_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_steps(steps: Sequence[Step], ctx: StepContext, log: Callable[[str], None] = print) -> list[Outcome]:
    """Runs ``steps`` in order, skipping the ones already done with the same key (see the module doc).

    Returns one Outcome per step. ``ctx.results`` is filled in as steps finish.
    """
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"step names are not unique: {names}")
    state_dir = ctx.workdir / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    outcomes: dict[str, Outcome] = {}
    for i, step in enumerate(steps, 1):
        label = f"[{i}/{len(steps)}] {step.name}" + (f": {step.title}" if step.title else "")
        unknown = [d for d in step.after if d not in outcomes]
        if unknown:
            raise ValueError(f"step {step.name!r} comes after unknown or later step(s) {unknown}")
        blocked = [d for d in step.after if outcomes[d].status not in ("done", "cached")]
        if blocked:
            outcomes[step.name] = Outcome(step.name, "blocked", step.title,
                                          error=f"needs {', '.join(blocked)}, which did not finish")
            log(f"{label} -- not run ({outcomes[step.name].error})")
            continue
        key = _digest({"version": step.version, "inputs": step.inputs(ctx),
                       "after": {d: keys[d] for d in step.after}})
        keys[step.name] = key
        record = read_state(ctx.workdir, step.name)
        if record and record.get("key") == key and record.get("state") == "done":
            ctx.results[step.name] = record["result"]
            outcomes[step.name] = Outcome(step.name, "cached", step.title, record["result"],
                                          record.get("seconds", 0.0), record.get("cpu_seconds", 0.0))
            log(f"{label} -- done earlier, skipped")
            continue
        out_dir = ctx.dir(step.name)
        if record and record.get("key") != key and step.clean and out_dir.exists():
            shutil.rmtree(out_dir)  # stale outputs (e.g. checkpoints of other hyper-parameters)
        out_dir.mkdir(parents=True, exist_ok=True)
        resumed = bool(record and record.get("key") == key)
        log(f"{label}" + (" -- resuming" if resumed else ""))
        _write_json(state_dir / f"{step.name}.json", {"key": key, "state": "running"})
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            result = step.run(ctx)
        except Exception as e:  # noqa: BLE001 -- recorded; the summary and the report show it
            (state_dir / f"{step.name}.error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            outcomes[step.name] = Outcome(step.name, "failed", step.title, seconds=time.perf_counter() - wall,
                                          cpu_seconds=time.process_time() - cpu, error=message)
            log(f"{label} -- FAILED: {message} (details: {state_dir / (step.name + '.error.txt')})")
            continue
        seconds, cpu_seconds = round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)
        _write_json(state_dir / f"{step.name}.json", {"key": key, "state": "done", "result": result,
                                                      "seconds": seconds, "cpu_seconds": cpu_seconds})
        ctx.results[step.name] = result
        outcomes[step.name] = Outcome(step.name, "done", step.title, result, seconds, cpu_seconds)
        log(f"{label} -- done in {seconds:.1f} s (CPU {cpu_seconds:.1f} s)")
    return [outcomes[n] for n in names]


def summary_table(outcomes: Sequence[Outcome]) -> str:
    """A plain-text table of the steps' status and times (cached steps show their original times)."""
    rows = [("step", "status", "wall s", "CPU s", "note")]
    for o in outcomes:
        rows.append((o.name, o.status, f"{o.seconds:.1f}", f"{o.cpu_seconds:.1f}", o.error))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else "")
                     for r in rows)
