"""The toy pipeline's step runner (fo_jax.toy.steps): skip, rerun on changed inputs, resume, failures."""

from __future__ import annotations

import json

import pytest

from fo_jax.toy.steps import Interrupted, Step, StepContext, read_state, run_steps, summary_table


class Recorder:
    """Steps that count their runs and write a file into their folder."""

    def __init__(self):
        self.calls: list[str] = []
        self.params = {"a": 1, "c": 1}
        self.fail_once: set[str] = set()

    def step(self, name: str, after: tuple[str, ...] = (), clean: bool = True) -> Step:
        def run(ctx: StepContext) -> dict:
            self.calls.append(name)
            (ctx.dir(name) / "partial.txt").write_text("x")
            if name in self.fail_once:
                self.fail_once.discard(name)
                raise RuntimeError(f"{name} broke")
            upstream = sum(ctx.results[d]["value"] for d in after)
            return {"value": self.params.get(name, 0) + upstream}

        return Step(name, run, lambda ctx: {"p": self.params.get(name)}, after=after, clean=clean)

    def pipeline(self) -> list[Step]:
        return [self.step("a"), self.step("b", after=("a",)), self.step("c", clean=False)]


def _run(rec: Recorder, tmp_path) -> tuple[list, StepContext]:
    ctx = StepContext(workdir=tmp_path, quick=True)
    return run_steps(rec.pipeline(), ctx, log=lambda _: None), ctx


def test_second_run_skips_finished_steps_and_reuses_results(tmp_path):
    rec = Recorder()
    first, _ = _run(rec, tmp_path)
    assert [o.status for o in first] == ["done", "done", "done"] and rec.calls == ["a", "b", "c"]
    assert read_state(tmp_path, "b")["result"] == {"value": 1} and read_state(tmp_path, "b")["state"] == "done"
    second, ctx = _run(rec, tmp_path)
    assert [o.status for o in second] == ["cached"] * 3 and rec.calls == ["a", "b", "c"]
    assert ctx.results == {"a": {"value": 1}, "b": {"value": 1}, "c": {"value": 1}}
    assert second[1].seconds == first[1].seconds  # cached steps keep their original times
    assert "cached" in summary_table(second)


def test_changed_input_reruns_the_step_and_what_comes_after_it(tmp_path):
    rec = Recorder()
    _run(rec, tmp_path)
    (tmp_path / "c" / "keep.txt").write_text("cache")
    rec.params["a"] = 5
    rec.params["c"] = 2
    outcomes, ctx = _run(rec, tmp_path)
    assert [o.status for o in outcomes] == ["done", "done", "done"]
    assert rec.calls == ["a", "b", "c", "a", "b", "c"]
    assert ctx.results["b"] == {"value": 5}  # b saw a's new result
    assert (tmp_path / "c" / "keep.txt").exists()  # clean=False keeps a changed step's folder
    rec.params["c"] = 3
    rec.params["a"] = 5
    outcomes, _ = _run(rec, tmp_path)
    assert [o.status for o in outcomes] == ["cached", "cached", "done"]  # only c changed


def test_changed_input_clears_stale_outputs_but_an_interrupted_step_resumes_in_place(tmp_path):
    rec = Recorder()
    rec.fail_once = {"a"}
    outcomes, _ = _run(rec, tmp_path)
    assert [o.status for o in outcomes] == ["failed", "blocked", "done"]
    assert outcomes[0].error == "a broke" and "needs a" in outcomes[1].error
    assert "RuntimeError: a broke" in (tmp_path / "steps" / "a.error.txt").read_text()
    assert read_state(tmp_path, "a")["state"] == "running"
    (tmp_path / "a" / "checkpoint").write_text("step 5")
    outcomes, _ = _run(rec, tmp_path)  # same key: resumes with its folder intact
    assert [o.status for o in outcomes] == ["done", "done", "cached"]
    assert (tmp_path / "a" / "checkpoint").exists()
    rec.params["a"] = 2
    _run(rec, tmp_path)  # new key: the stale checkpoint goes
    assert not (tmp_path / "a" / "checkpoint").exists()


def test_step_records_are_json_and_bad_pipelines_are_refused(tmp_path):
    rec = Recorder()
    _run(rec, tmp_path)
    record = json.loads((tmp_path / "steps" / "a.json").read_text())
    assert set(record) == {"key", "state", "result", "seconds", "cpu_seconds"}
    ctx = StepContext(workdir=tmp_path, quick=True)
    with pytest.raises(ValueError, match="unique"):
        run_steps([rec.step("a"), rec.step("a")], ctx, log=lambda _: None)
    with pytest.raises(ValueError, match="unknown or later"):
        run_steps([rec.step("b", after=("a",)), rec.step("a")], ctx, log=lambda _: None)


def test_a_training_stage_stopped_by_sigterm_ends_the_run_and_the_rerun_resumes_it(tmp_path, monkeypatch):
    """The trainer returns normally after saving on SIGTERM; the toy must not record the stage as done."""
    import fo_jax.training.trainer as trainer
    from fo_jax.toy import pipeline

    calls = []

    def fake_train(cfg, workdir, progress=True):
        calls.append(workdir)
        first = len(calls) == 1
        return {"step": 7 if first else 20, "preempted": first, "metrics": {"loss": 1.0}, "rejected": []}

    monkeypatch.setattr(trainer, "train", fake_train)
    later = []
    steps = [Step("stage", lambda ctx: pipeline._train(ctx, "stage", "configs/speech_in_stage1.py", []),
                  lambda ctx: {}),
             Step("after", lambda ctx: later.append(1) or {}, lambda ctx: {}, after=("stage",))]
    ctx = StepContext(workdir=tmp_path, quick=True, progress=False)
    with pytest.raises(Interrupted, match="stage stopped at step 7 .*rerun the same command"):
        run_steps(steps, ctx, log=lambda _: None)
    assert read_state(tmp_path, "stage")["state"] == "running" and later == []
    logs = []
    outcomes = run_steps(steps, StepContext(workdir=tmp_path, quick=True, progress=False), log=logs.append)
    assert [o.status for o in outcomes] == ["done", "done"] and outcomes[0].result["steps"] == 20
    assert calls == [str(tmp_path / "stage" / "run")] * 2 and "resuming" in logs[0]
