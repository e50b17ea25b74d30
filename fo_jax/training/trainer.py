"""The training loop shared by every stage: sharded, checkpointed, resumable, preemption-safe.

``train(cfg, workdir)`` builds the stage, places its params on the mesh, splits them into
trainable and frozen trees, resumes from ``workdir/checkpoints`` when a checkpoint exists (checking
that the frozen weights are bitwise the ones it was trained against), and runs the jitted step
with a progress bar. Metrics go to ``workdir/metrics.jsonl``. SIGTERM (preemption) saves a
checkpoint at once and stops; rerunning the same command continues where it stopped.
TensorBoard scalars go to ``workdir/tensorboard``.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tensorboardX import SummaryWriter
from tqdm import tqdm

from fo_jax import sharding
from fo_jax.errors import FoJaxError
from fo_jax.training import distributed
from fo_jax.training.checkpoint import TrainCheckpointer
from fo_jax.training.freeze import fingerprint, split_trainable
from fo_jax.training.optim import OptimizerConfig, make_optimizer
from fo_jax.training.stages import build_stage
from fo_jax.training.step import StageStep, make_train_step


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _optimizer_shardings(init, trainable, mesh):
    """Shardings of ``init(trainable)``'s output. A state leaf that mirrors a param (its path ends
    with the param's path, same shape: Adam's moments, however the state nests) is sharded like
    it, the rest (step counters) replicated. (Left to itself, XLA replicates the zeros that init
    creates: the whole optimizer state on every device.)"""
    params = {tuple(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(trainable)}
    replicated = NamedSharding(mesh, P())

    def sharding_of(path, leaf):
        for i in range(len(path)):
            param = params.get(tuple(path[i:]))
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_of, jax.eval_shape(init, trainable))


def stage_step(stage: Any, optimizer_cfg: OptimizerConfig, mesh: Mesh | None = None) -> StageStep:
    """The stage's own ``make_step`` if it has one, else the generic step on ``stage.loss`` (traced
    under ``mesh``'s activation rules when given)."""
    if hasattr(stage, "make_step"):
        return stage.make_step(optimizer_cfg)
    optimizer = make_optimizer(optimizer_cfg)
    return StageStep(optimizer.init, make_train_step(stage.loss, optimizer, mesh=mesh))


@dataclasses.dataclass
class Setup:
    """A run before any weights load: its mesh, stage, RNG and where its state lives.

    ``trainable`` / ``frozen``: the params as ``jax.ShapeDtypeStruct``s with their shardings.
    ``opt_init``: jitted ``trainable -> opt_state``, the state sharded like the params it mirrors.
    ``step``: the stage's jitted step with its new trainable tree and optimizer state placed exactly
    as they came in (left to XLA, the outputs' shardings may differ from the inputs', and the
    second step would compile the whole program again for them).
    """

    mesh: Mesh
    stage: Any
    rng: jax.Array
    shardings: Any
    trainable: Any
    frozen: Any
    opt_state: Any
    opt_init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, Any, dict]]


def setup(cfg: ml_collections.ConfigDict) -> Setup:
    """Joins the other processes (if any), builds the mesh and the stage, and jits its updates."""
    distributed.initialize()
    mesh = sharding.make_mesh(tuple(cfg.get("mesh", {}).get("shape", (-1, 1, 1))))
    stage = build_stage(cfg)
    rng = jax.random.key(cfg.get("seed", 0))
    boxed = jax.eval_shape(stage.init_boxed, rng)
    shardings = sharding.param_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed),
                            shardings)
    trainable, frozen = split_trainable(abstract, stage.trainable)
    update = stage_step(stage, OptimizerConfig.from_dict(cfg.optimizer.to_dict()), mesh)
    opt_shardings = _optimizer_shardings(update.init, trainable, mesh)
    opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             jax.eval_shape(update.init, trainable), opt_shardings)
    placed = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    step = jax.jit(update.step, donate_argnums=(0, 1), out_shardings=(placed(trainable), opt_shardings, None))
    return Setup(mesh, stage, rng, shardings, trainable, frozen, opt_state,
                 jax.jit(update.init, out_shardings=opt_shardings), step)


def train(cfg: ml_collections.ConfigDict, workdir: str, max_steps: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Trains ``cfg.stage.steps`` steps in total (or stops after ``max_steps`` more). Returns a summary."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = setup(cfg)
    mesh, stage, rng, step_fn = run.mesh, run.stage, run.rng, run.step
    params = jax.device_put(stage.load_params(rng), run.shardings)
    trainable, frozen = split_trainable(params, stage.trainable)
    frozen_print = fingerprint(frozen)
    opt_state = run.opt_init(trainable)
    data = stage.dataset(cfg.get("seed", 0))
    iterator = iter(data)
    checkpointer = TrainCheckpointer(workdir, save_every=cfg.stage.get("save_every", 1000),
                                     keep=cfg.stage.get("keep", 3))
    start, rng = 0, jax.random.fold_in(rng, 1)
    if checkpointer.latest_step() is not None:
        start, trainable, opt_state, rng, data_state, meta = checkpointer.restore(trainable, opt_state)
        if meta["frozen_fingerprint"] != frozen_print:
            raise FoJaxError(f"{checkpointer.directory}: the frozen weights differ from the ones this run "
                             f"was trained against (fingerprint {meta['frozen_fingerprint'][:12]}...)")
        iterator.set_state(data_state)
    # A stage's own meta (e.g. CMVN statistics, frozen yet data-derived) rides along for later stages.
    meta = {"config": cfg.to_dict(), "frozen_fingerprint": frozen_print, **getattr(stage, "meta", {})}
    total = cfg.stage.steps if max_steps is None else min(cfg.stage.steps, start + max_steps)
    log_every = cfg.stage.get("log_every", 10)
    preemption = _Preemption()
    # Process 0 alone writes logs: on a pod every worker shares the work directory.
    primary = jax.process_index() == 0
    metrics_file = open(workdir / "metrics.jsonl", "a") if primary else None
    board = SummaryWriter(str(workdir / "tensorboard")) if primary else None
    step, last, tic = start, {}, time.time()
    try:
        with tqdm(total=cfg.stage.steps, initial=start, desc=cfg.stage.name, unit="step",
                  disable=not progress or not primary) as bar:
            while step < total and not preemption.requested:
                batch = distributed.global_batch(next(iterator), mesh)
                trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                                        jax.random.fold_in(rng, step))
                step += 1
                bar.update(1)
                if step % log_every == 0 or step == total:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    rate = log_every / max(time.time() - tic, 1e-9)
                    tic = time.time()
                    bar.set_postfix(loss=f"{last['loss']:.4f}", steps_per_s=f"{rate:.1f}")
                    if primary:
                        metrics_file.write(json.dumps({"step": step, **last}) + "\n")
                        metrics_file.flush()
                        for name, value in last.items():
                            board.add_scalar(f"train/{name}", value, step)
                        board.add_scalar("train/steps_per_second", rate, step)
                checkpointer.save(step, trainable, opt_state, rng, iterator.get_state(), meta,
                                  force=step == total or preemption.requested)
    finally:
        if primary:
            metrics_file.close()
            board.close()
        checkpointer.close()
        preemption.restore()
    return {"step": step, "preempted": preemption.requested, "metrics": last,
            "frozen_fingerprint": frozen_print, "trainable": trainable, "frozen": frozen, "opt_state": opt_state,
            "rejected": getattr(stage, "rejected", [])}


def compile_only(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Lowers and compiles the train step for the configured mesh from abstract inputs only.

    Returns per-device bytes: params (trainable + frozen), optimizer state, batch, and XLA's
    temporary memory, from the compiled executable's memory analysis.
    """
    run = setup(cfg)
    mesh, stage, trainable, frozen, opt_state = run.mesh, run.stage, run.trainable, run.frozen, run.opt_state
    # Stages that can describe their batches abstractly need no data (nor weights) to be checked.
    example = stage.example_batch() if hasattr(stage, "example_batch") else next(iter(stage.dataset(0)))
    batch = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:], v.dtype,
                                     sharding=NamedSharding(mesh, distributed.batch_spec(v.ndim)))
             for k, v in example.items()}
    compiled = run.step.lower(trainable, opt_state, frozen, batch, run.rng).compile()
    analysis = compiled.memory_analysis()

    def per_device(tree):
        return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                       for x in jax.tree.leaves(tree)))

    return {"mesh": dict(mesh.shape), "devices": int(mesh.size),
            "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable))),
            "frozen_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(frozen))),
            "per_device_bytes": {"trainable": per_device(trainable), "frozen": per_device(frozen),
                                 "optimizer": per_device(opt_state), "batch": per_device(batch),
                                 "temp": int(getattr(analysis, "temp_size_in_bytes", 0)),
                                 "arguments": int(getattr(analysis, "argument_size_in_bytes", 0)),
                                 "outputs": int(getattr(analysis, "output_size_in_bytes", 0))}}
