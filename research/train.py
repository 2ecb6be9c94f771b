"""The train step and the training loop.

`make_train_step` builds ONE jit-compiled function over the device mesh: parameters replicated, the batch
split along the data axis, the state donated. It knows nothing of the model family or the objective: it
merges the parameters into the model, reseeds the dropout streams from (seed, step), calls
`loss_fn(model, batch, rng) -> (loss, aux)`, averages gradients over micro-batches, and applies the optax
update. A new objective is a new `loss_fn`, never a branch in here (an objective with state of its own,
`objectives.state.StatefulObjective`, gets it threaded through the train state).

`train` is the loop: data -> step -> metrics -> evaluation -> checkpoints, resumable bit-exactly because
everything random is a function of (seed, step) or (seed, epoch) and the data position is checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from research import experiment
from research.checkpoint import Checkpoints
from research.config import ConfigError, ExperimentConfig
from research.data.batches import epoch_batches, oversampling, steps_per_epoch
from research.evaluate import evaluate_splits, make_eval_step
from research.generate import complete
from research.metrics import MetricWriter, trim_jsonl
from research.objectives import PAIR_OBJECTIVES, make_objective
from research.objectives.state import StatefulObjective
from research.optim import make_optimizer
from research.sharding import (
    DATA_AXIS,
    batch_sharding,
    check_divisible,
    init_distributed,
    make_mesh,
    put_batch,
    replicated,
    state_shardings,
)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step."""


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (e.g. training over an existing run without --resume)."""


class TrainStep:
    """The compiled step `(state, batch) -> (state, metrics)`; `traces` counts compilations (one per
    distinct batch shape, i.e. per length bucket)."""

    def __init__(self, fn: Callable, rest: nnx.State):
        self._fn, self._rest, self.traces = fn, rest, 0

    def __call__(self, state: dict, batch: dict) -> tuple[dict, dict]:
        return self._fn(state, self._rest, batch)

    def lower(self, state: dict, batch: dict):
        """The lowered step (for XLA's cost analysis or HLO inspection)."""
        return self._fn.lower(state, self._rest, batch)


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, compute_dtype: str = "float32",
                    state_sharding=None) -> TrainStep:
    """`graphdef` is the model in train mode built with the compute dtype; `rest` its non-parameter state
    (the dropout streams). The state is {"params", "opt_state", "step", "rng"}, plus "objective" for a
    `StatefulObjective`; batches are laid out (micro-batches, rows, ...) as `put_batch` makes them."""
    stateful = isinstance(loss_fn, StatefulObjective)

    def grads_of(params, rest, micro_batch, key, objective_state):
        dropout_key, objective_key = jax.random.split(key)

        def loss_of(params):
            cast = jax.tree.map(lambda p: p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                                params)  # float32 master weights, compute in compute_dtype
            # A copy of `rest`: NNX refuses to mutate (reseed) variables created under another trace level.
            model = nnx.merge(graphdef, cast, jax.tree.map(lambda x: x, rest))
            nnx.reseed(model, default=dropout_key)  # a fresh, distinct key for every dropout layer
            if stateful:
                loss, aux, new_state = loss_fn.loss(model, micro_batch, objective_key, objective_state)
                return loss, (aux, new_state)
            loss, aux = loss_fn(model, micro_batch, objective_key)
            return loss, (aux, None)

        (loss, (aux, new_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return loss, aux, grads, new_state

    def step(state, rest, batch):
        wrapper.traces += 1  # runs only while tracing
        params = state["params"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        objective_state = state.get("objective")
        n_micro = batch["labels"].shape[0]
        if n_micro == 1:
            loss, aux, grads, objective_state = grads_of(params, rest, jax.tree.map(lambda x: x[0], batch), key,
                                                         objective_state)
        else:
            # Each micro-batch's mean is weighted by its number of real examples, so the sum divided by the
            # total weight is the gradient of the whole batch's mean (filler rows carry weight 0).
            def weighted(micro_batch, k):
                loss, aux, grads, new_state = grads_of(params, rest, micro_batch, k, objective_state)
                w = aux.pop("weight")
                return {"loss": loss * w, "aux": {n: v * w for n, v in aux.items()},
                        "grads": jax.tree.map(lambda g: g * w, grads), "weight": w,
                        "objective": jax.tree.map(lambda x: x * w, new_state)}

            keys = jax.random.split(key, n_micro)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(weighted, jax.tree.map(lambda x: x[0], batch), keys[0]))
            total, _ = jax.lax.scan(lambda acc, xs: (jax.tree.map(jnp.add, acc, weighted(*xs)), None),
                                    zeros, (batch, keys))
            w = jnp.maximum(total["weight"], 1.0)
            loss, grads = total["loss"] / w, jax.tree.map(lambda g: g / w, total["grads"])
            aux = {n: v / w for n, v in total["aux"].items()}
            objective_state = jax.tree.map(lambda x: (x / w).astype(x.dtype), total["objective"])
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = {"train/loss": loss, **{f"train/{n}": v for n, v in aux.items() if n != "weight"},
                   "train/grad_norm": optax.tree.norm(grads), "train/update_norm": optax.tree.norm(updates),
                   "train/param_norm": optax.tree.norm(params), "train/lr": schedule(state["step"])}
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        if stateful:
            new["objective"] = objective_state
        return new, metrics

    state_sharding = replicated(mesh) if state_sharding is None else state_sharding
    jitted = jax.jit(step, in_shardings=(state_sharding, replicated(mesh), batch_sharding(mesh)),
                     out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)
    wrapper = TrainStep(jitted, rest)
    return wrapper


# -------------------------------------------------------------------------------------------- the loop


class Interrupted(RuntimeError):
    """SIGTERM stopped the run after it saved a checkpoint of the step it was on; `research train` exits with
    EXIT_SIGTERM, and --resume continues with no step lost."""


EXIT_SIGTERM = 143  # 128 + SIGTERM: what a shell and a job scheduler report for a terminated job


def train(cfg: ExperimentConfig, workdir: str | Path, resume: bool = False,
          resume_step: int | None = None) -> dict[str, float]:
    """Train `cfg` in `workdir`; returns the last evaluation's metrics. See the module docstring.

    `resume_step` resumes from that (older) checkpoint instead of the latest, deleting the later ones:
    e.g. after the latest failed verification."""
    init_distributed()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with experiment.lock_run_dir(workdir):
        return _train(cfg, workdir, resume, resume_step)


def _train(cfg: ExperimentConfig, workdir: Path, resume: bool, resume_step: int | None) -> dict[str, float]:
    mesh = make_mesh()
    t = cfg.train
    check_divisible(t.batch_size, t.grad_accum, mesh)
    check_divisible(t.eval_batch_size, 1, mesh, "train.eval_batch_size")
    ckpts = Checkpoints(workdir, cfg.checkpoint.keep, cfg.checkpoint.best_metric, cfg.checkpoint.best_mode)
    latest = ckpts.latest_step()
    if latest is not None and not resume:
        raise RunError(f"{workdir} already holds checkpoints (latest step {latest}); pass --resume to continue "
                       "that run, or choose another --workdir")
    if resume_step is not None:
        if not resume or resume_step not in ckpts.complete_steps():
            raise RunError(f"--resume-step {resume_step} needs --resume and a complete checkpoint of that step in "
                           f"{workdir}/checkpoints (complete: {ckpts.complete_steps()})")
        dropped = ckpts.drop_after(resume_step)
        if dropped:
            print(f"resuming from step {resume_step} as asked: deleted the later checkpoints {dropped}")
        latest = resume_step

    pieces = experiment.prepare(cfg)
    if pieces.labels:  # the label set resolved (a causal LM has none)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=pieces.labels))
    groups = t.grad_accum * mesh.shape[DATA_AXIS]  # blocks of a batch: one per micro-batch and device shard
    train_split = pieces.train
    if train_split.environments is not None and train_split.pair_ids is None:  # say what stratifying costs
        draws = oversampling(train_split.environments, len(train_split.environment_names), t.batch_size, groups,
                             cfg.data.environment_proportions)
        train_split.report.draws_per_epoch = {train_split.environment_names[e]: round(v, 3) for e, v in draws.items()}
    _record_run(workdir, cfg, pieces, resuming=latest is not None)

    model = pieces.model
    model.eval()
    eval_graphdef, _, eval_rest = nnx.split(model, nnx.Param, ...)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if t.compute_dtype != "float32":  # same structure, layers computing in compute_dtype
        low = dataclasses.replace(model.config, dtype=t.compute_dtype)
        abstract = nnx.eval_shape(lambda: type(model)(low, rngs=nnx.Rngs(0)))
        abstract.train()
        graphdef = nnx.graphdef(abstract)
    params = nnx.to_pure_dict(params)

    per_epoch = steps_per_epoch(pieces.train, t.batch_size, groups, cfg.data.environment_proportions)
    total = t.max_steps if t.max_steps is not None else math.ceil(t.epochs * per_epoch)
    tx, schedule = make_optimizer(cfg.optim, model, params, total)
    objective = make_objective(cfg.objective, pieces.train.environment_names)
    if cfg.objective.name in PAIR_OBJECTIVES and pieces.train.pair_ids is None:
        raise ConfigError(f"objective.name={cfg.objective.name!r} works on counterfactual pairs: set data.pair_column "
                          "to the column that pairs the training rows")
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(t.seed))}
    if isinstance(objective, StatefulObjective):
        state["objective"] = objective.init_state(params)
    sharding = state_shardings(state, mesh, t.fsdp)  # replicated, or FSDP
    state = jax.device_put(state, sharding)
    meta = {"epoch": 0, "batch": 0, "best": None, "best_step": None, "evals_since_best": 0}
    if latest is not None:
        state, meta = ckpts.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                 state), latest)
        print(f"resumed from {workdir}/checkpoints/{latest} (epoch {meta['epoch']}, batch {meta['batch']})")
    start = int(state["step"])
    ckpts.drop_best_after(start)
    if cfg.checkpoint.patience is not None and meta["evals_since_best"] >= cfg.checkpoint.patience:
        total = start  # this run already stopped early; resuming it has nothing left to do
    if start >= total:
        print(f"{workdir} is complete (step {start} of {total}); nothing to train")

    train_step = make_train_step(graphdef, rest, objective, tx, schedule, mesh, t.compute_dtype, sharding)
    eval_step = make_eval_step(eval_graphdef, eval_rest, mesh, token_sums=cfg.model.task == "causal_lm")
    # Records after the restored step (all of them when no checkpoint was reached) are written again.
    writer = MetricWriter(workdir, resume_step=start)
    samples = workdir / "samples.jsonl"
    if jax.process_index() == 0:
        trim_jsonl(samples, start)  # as metrics.jsonl
    d, c = cfg.data, cfg.checkpoint

    def write_samples(step: int) -> None:
        """What the LM writes now, next to its perplexity: greedy continuations of the configured prompts and
        of the first dev dialogue contexts (with their reference responses)."""
        n = t.sample_dev_examples
        prompts = [*t.sample_prompts, *pieces.dev.texts[:n]]
        references = [None] * len(t.sample_prompts) + (pieces.dev.responses or [])[:n]
        model = nnx.merge(eval_graphdef, state["params"], eval_rest)
        texts = complete(model, pieces.tokenizer, prompts, max_new_tokens=t.sample_tokens)
        shown = []
        with samples.open("a") as f:
            for prompt, text, reference in zip(prompts, texts, references, strict=True):
                record = {"step": step, "prompt": prompt, "text": text}
                shown.append(f"{prompt}{text}")
                if reference is not None:
                    record["reference"] = reference
                    shown[-1] += f"\n[reference: {reference}]"
                f.write(json.dumps(record) + "\n")
        writer.write_text(step, "samples", "\n\n".join(shown))

    def evaluate(step: int) -> dict[str, float]:
        metrics, reports = evaluate_splits(eval_step, state["params"], pieces, t.eval_batch_size, d.buckets, mesh)
        for prefix, report in reports.items():
            writer.write_text(step, f"{prefix}/report", report)
        if (t.sample_prompts or t.sample_dev_examples) and jax.process_index() == 0:
            write_samples(step)
        writer.write(step, metrics)
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                if k.startswith("dev/") or k.endswith("/accuracy")))
        return metrics

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal="SIGTERM"))
    bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0, desc=cfg.name, dynamic_ncols=True)
    window, examples, tokens, t0 = [], 0.0, 0, time.perf_counter()
    last_eval: dict[str, float] = {}
    step, epoch, first_batch = start, meta["epoch"], meta["batch"]
    try:
        while step < total and stop["signal"] is None:
            for b, batch in epoch_batches(pieces.train, t.batch_size, d.buckets, pieces.pad_id, t.seed, epoch,
                                          first_batch, pack_length=d.pack_length, micro_batches=t.grad_accum,
                                          shards=mesh.shape[DATA_AXIS], proportions=d.environment_proportions):
                state, metrics = train_step(state, put_batch(batch, mesh, t.grad_accum))
                # One small host transfer per step: the NaN check must see every loss before any checkpoint
                # of that step is written (on CPU the step dominates; the data for the next step is ready).
                metrics = jax.device_get(metrics)
                step += 1
                if not (np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/grad_norm"])):
                    last = ckpts.latest_step()
                    raise NonFiniteLossError(
                        f"non-finite loss {metrics['train/loss']} (grad norm {metrics['train/grad_norm']}) at step "
                        f"{step} (epoch {epoch}, batch {b}); nothing was saved for it "
                        f"({f'the last checkpoint is step {last}' if last is not None else 'no checkpoint yet'}). "
                        "Lower optim.lr, check the data, or use train.compute_dtype=float32")
                window.append(metrics)
                examples += float(batch["weights"].sum())
                tokens += int(batch["attention_mask"].sum())  # non-padding tokens (filler repeats included)
                meta.update(epoch=epoch + (b + 1 == per_epoch), batch=(b + 1) % per_epoch)
                bar.update(1)
                if step % t.log_every == 0 or step == total:
                    seconds = time.perf_counter() - t0
                    logged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                    logged.update({"train/examples_per_s": examples / seconds, "train/tokens_per_s": tokens / seconds,
                                   "train/epoch": step / per_epoch, "train/compilations": train_step.traces})
                    writer.write(step, logged)
                    bar.set_postfix(loss=f"{logged['train/loss']:.4f}", lr=f"{logged['train/lr']:.2e}")
                    window, examples, tokens = [], 0.0, 0
                end_of_epoch = b + 1 == per_epoch
                early_stop = False
                if step == total or (step % t.eval_every == 0 if t.eval_every else end_of_epoch):
                    last_eval = evaluate(step)
                    early_stop = _track_best(ckpts, c, meta, step, state["params"], last_eval)
                if step % c.every_steps == 0 or step == total or stop["signal"] or early_stop:
                    writer.flush()
                    ckpts.save(step, state, meta)
                if early_stop:
                    tqdm.write(f"early stopping at step {step}: no {c.best_metric} improvement in {c.patience} "
                               f"evaluations (best {meta['best']:.4f} at step {meta['best_step']})")
                    total = step
                if stop["signal"] or step == total:
                    break
                if step % t.log_every == 0:
                    t0 = time.perf_counter()  # throughput excludes evaluation and checkpointing
            epoch, first_batch = epoch + 1, 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        writer.close()
        ckpts.close()
    if stop["signal"]:
        raise Interrupted(f"{stop['signal']}: saved a checkpoint at step {step} of {total}; resume with --resume")
    return last_eval


def _track_best(ckpts: Checkpoints, c, meta: dict, step: int, params: dict, metrics: dict) -> bool:
    """Update the best-so-far record (and best/ checkpoint); True when early stopping should trigger."""
    if c.best_metric is None:
        return False
    if c.best_metric not in metrics:
        raise KeyError(f"checkpoint.best_metric={c.best_metric!r} is not an evaluation metric; "
                       f"choose from {sorted(metrics)}")
    value = metrics[c.best_metric]
    better = meta["best"] is None or (value > meta["best"] if c.best_mode == "max" else value < meta["best"])
    if better:
        meta.update(best=value, best_step=step, evals_since_best=0)
        ckpts.save_best(step, params, metrics)
    else:
        meta["evals_since_best"] += 1
    return c.patience is not None and meta["evals_since_best"] >= c.patience


def _record_run(workdir: Path, cfg: ExperimentConfig, pieces: experiment.Pieces, resuming: bool) -> None:
    """Write config.json and data_report.json; when resuming, refuse a config that differs from the run's."""
    if resuming and (workdir / "config.json").exists():
        saved = experiment.read_run_config(workdir)
        if experiment.normalized(saved) != experiment.normalized(cfg):
            a, b = experiment.normalized(saved).to_dict(), experiment.normalized(cfg).to_dict()
            diff = [f"{g}.{k}: {a[g][k]!r} -> {b[g][k]!r}" for g in a if isinstance(a[g], dict)
                    for k in a[g] if a[g][k] != b[g][k]]
            raise RunError(f"--resume with a config that differs from {workdir}/config.json ({'; '.join(diff)}); "
                           "a resumed run must be the same experiment: start a new --workdir instead")
    if jax.process_index() != 0:
        return
    if not resuming:
        experiment.write_run_config(workdir, cfg)
    splits = (pieces.train, pieces.dev, *pieces.tests.values())
    reports = {s.name: dataclasses.asdict(s.report) for s in splits}
    (workdir / "data_report.json").write_text(json.dumps(reports, indent=2) + "\n")
    for s in splits:
        print(f"data {s.report.summary()}")
