"""Training checkpoints with orbax ``CheckpointManager``: async, keep-last-N, resumable.

Each step directory holds ``trainable`` and ``opt_state`` (arrays), ``state`` (step and RNG key
data), ``data`` (the input iterator's state, JSON) and ``meta`` (resolved config and the frozen
weights' fingerprint, JSON). Frozen weights are never written: they are reloaded from their source
and checked against the fingerprint on resume. A save interrupted mid-way leaves no step behind
(orbax commits a step atomically), so the last complete checkpoint stays loadable.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fo_jax.errors import LoadError
from fo_jax.training.freeze import flatten, unflatten


class TrainCheckpointer:
    """Saves and restores one run's training state under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | os.PathLike, save_every: int = 1000, keep: int = 3,
                 async_save: bool = True):
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("trainable", "opt_state", "state", "data", "meta"), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trainable: Any, opt_state: Any, rng: jax.Array, data_state: Any,
             meta: dict, force: bool = False) -> bool:
        """Saves when the policy says so (every ``save_every`` steps) or ``force``; returns whether it did."""
        # Host numpy, not the key's single-device array: orbax refuses those in a multi-process run.
        state = {"step": np.asarray(step, np.int64), "rng": np.asarray(jax.random.key_data(rng))}
        return self.manager.save(step, args=ocp.args.Composite(
            trainable=ocp.args.StandardSave(trainable), opt_state=ocp.args.StandardSave(opt_state),
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, trainable_like: Any, opt_state_like: Any, step: int | None = None):
        """Restores (step, trainable, opt_state, rng, data_state, meta) of ``step`` (default latest).

        ``*_like`` are trees of arrays or ``jax.ShapeDtypeStruct``s (with shardings, to restore sharded).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise LoadError(f"{self.directory}: no checkpoint to restore")
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        rng_like = np.asarray(jax.random.key_data(jax.random.key(0)))
        out = self.manager.restore(step, args=ocp.args.Composite(
            trainable=ocp.args.StandardRestore(abstract(trainable_like)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
            state=ocp.args.StandardRestore({"step": np.asarray(0, np.int64), "rng": rng_like}),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        rng = jax.random.wrap_key_data(out.state["rng"])
        return int(out.state["step"]), out.trainable, out.opt_state, rng, out.data, out.meta

    def wait(self) -> None:
        """Blocks until an async save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@contextlib.contextmanager
def _orbax_quiet():
    """Hides orbax's warnings about a read-only manager and the items ``load_trained`` skips
    (optimizer state, data iterator): expected there, noise in every later stage's log."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_trained(workdir: str | os.PathLike, step: int | None = None) -> tuple[dict, dict]:
    """(trainable params as numpy arrays, meta) of a finished or interrupted run.

    How one stage starts from another (speech-in 2 from the stage-1 encoder, say): the run's
    checkpoint holds only what trained there; the frozen rest comes from its own sources.
    """
    with _read_only(workdir) as manager:
        step = _step(manager, workdir, step)
        # Whole arrays on this process's first device, whatever mesh (and processes) saved them:
        # orbax would otherwise insist on the saving run's devices.
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                            manager.item_metadata(step)["trainable"])
        out = manager.restore(step, args=ocp.args.Composite(trainable=ocp.args.StandardRestore(like),
                                                            meta=ocp.args.JsonRestore()))
    return jax.tree.map(np.asarray, dict(out.trainable)), dict(out.meta) | {"step": int(step)}


# Stage fields naming the run a stage starts from (speech-in 3's, speech-in 2's, speech-out 3's).
START_RUN_FIELDS = ("speech_from", "encoder_from", "decoder_from")


def load_lineage(run: str | os.PathLike) -> tuple[dict, dict]:
    """(params, meta) of a run: the leaves it trained over those of the runs it started from.

    A checkpoint holds only what trained there, so the leaves a stage kept frozen (a toy speech-in
    stage's subsampling convs, speech-in 3's adapter, speech-out 3's shared decoder) come from the
    run it started from (``START_RUN_FIELDS`` in its config), followed back to a run that started
    from scratch. Parts only an earlier run has (speech-in 1's CTC head) come along; callers take the
    parts they need. A start run that is gone adds nothing (meta notes it as ``start_run_missing``).
    """
    def start_of(run_meta: dict) -> str | None:
        stage = run_meta["config"].get("stage", {})
        return next((stage[f] for f in START_RUN_FIELDS if stage.get(f)), None)

    trained, meta = load_trained(run)
    merged = {part: flatten(leaves) for part, leaves in trained.items()}
    seen, start = {os.path.realpath(run)}, start_of(meta)
    while start and os.path.realpath(start) not in seen:
        if not os.path.isdir(os.path.join(start, "checkpoints")):
            meta = meta | {"start_run_missing": start}
            break
        seen.add(os.path.realpath(start))
        earlier, earlier_meta = load_trained(start)
        for part, leaves in earlier.items():
            merged[part] = flatten(leaves) | merged.get(part, {})  # the later run's leaves win
        start = start_of(earlier_meta)
    return {part: unflatten(leaves) for part, leaves in merged.items()}, meta


def load_run_meta(workdir: str | os.PathLike, step: int | None = None) -> dict:
    """A run's meta (as ``load_trained`` returns it) without reading its arrays."""
    with _read_only(workdir) as manager:
        step = _step(manager, workdir, step)
        out = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out.meta) | {"step": int(step)}


@contextlib.contextmanager
def _read_only(workdir: str | os.PathLike):
    """A read-only manager over ``workdir/checkpoints`` (LoadError if there is none), orbax quiet."""
    directory = Path(workdir).resolve() / "checkpoints"
    if not directory.is_dir():
        raise LoadError(f"{workdir}: no training run here (no checkpoints/ folder)")
    with _orbax_quiet():
        manager = ocp.CheckpointManager(directory, item_names=("trainable", "meta"),
                                        item_handlers={"trainable": ocp.StandardCheckpointHandler(),
                                                       "meta": ocp.JsonCheckpointHandler()},
                                        options=ocp.CheckpointManagerOptions(create=False, read_only=True))
        try:
            yield manager
        finally:
            manager.close()


def _step(manager: ocp.CheckpointManager, workdir: str | os.PathLike, step: int | None) -> int:
    step = manager.latest_step() if step is None else step
    if step is None:
        raise LoadError(f"{Path(workdir).resolve() / 'checkpoints'}: no complete checkpoint")
    return step


def check_like(tree: dict, like: dict, source: str) -> None:
    """Raises LoadError (one line naming ``source`` and the first offending path) unless ``tree``
    has exactly the paths and shapes of ``like`` (arrays or ShapeDtypeStructs)."""
    got, want = flatten(tree), flatten(like)
    for path in sorted(set(got) | set(want)):
        if path not in got:
            raise LoadError(f"{source}: missing param {path!r}")
        if path not in want:
            raise LoadError(f"{source}: unexpected param {path!r}")
        if tuple(np.shape(got[path])) != tuple(want[path].shape):
            raise LoadError(f"{source}: param {path!r} has shape {tuple(np.shape(got[path]))}, "
                            f"this config expects {tuple(want[path].shape)}")
