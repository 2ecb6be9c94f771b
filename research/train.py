"""The train step and the training loop.

`make_train_step` builds ONE jit-compiled function over the device mesh: parameters replicated, the batch
split along the data axis, the state donated. It knows nothing of the model family or the objective: it
merges the parameters into the model, reseeds the dropout streams from (seed, step), calls
`loss_fn(model, batch, rng) -> (loss, aux)`, averages gradients over micro-batches, and applies the optax
update. A new objective is a new `loss_fn`, never a branch in here (an objective with state of its own,
`objectives.state.StatefulObjective`, gets it threaded through the train state).

`train` sets the run up (run directory and resume point: research/run.py; pieces; model views; optimizer,
objective and state, restored when resuming), then loops: the step, then the hooks, each a small object
with its own schedule (`due(step)`): Logging, Evaluation (with the best checkpoint and early stopping),
Samples and Checkpointing. Adding periodic work is adding a hook. SIGTERM and early stopping end the loop
through one `Stop`. A run resumes bit-exactly because everything random is a function of (seed, step) or
(seed, epoch) and the data position is checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from research import experiment, peft
from research import run as run_dir
from research.batch import Batch
from research.checkpoint import Checkpoints
from research.compress import pruning, teacher
from research.config import ConfigError, ExperimentConfig
from research.data.batches import epoch_batches, oversampling, steps_per_epoch
from research.data.dialogue import DialogueSplit
from research.evaluate import evaluate_splits, make_eval_step
from research.generate import complete
from research.metrics import MetricWriter, trim_jsonl
from research.objectives import PAIR_OBJECTIVES, make_objective, objective_modules
from research.objectives.state import StatefulObjective
from research.optim import make_optimizer
from research.sharding import (
    DATA_AXIS,
    batch_sharding,
    check_divisible,
    init_distributed,
    make_mesh,
    place_rest,
    put_batch,
    replicated,
    state_shardings,
)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step."""


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
    `StatefulObjective` and "objective_params" for an objective's own trained modules; batches are laid out
    (micro-batches, rows, ...) as `put_batch` makes them."""
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
            else:
                (loss, aux), new_state = loss_fn(model, micro_batch, objective_key), None
            penalty = peft.penalty(model)  # the PEFT method's own regularizer (AdaLoRA's); None for the others
            if penalty is not None:
                loss, aux = loss + penalty, {**aux, "peft_penalty": penalty}
            return loss, (aux, new_state)

        (loss, (aux, new_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return loss, aux, grads, new_state

    def step(state, rest, batch):
        wrapper.traces += 1  # runs only while tracing
        # The objective's own parameters (TinyBERT's projection) train with the model's, in one tree: one
        # optimizer, one clipping norm, as torch's optimizer over both parameter lists.
        own = state.get("objective_params", {})
        params = {**state["params"], **own}
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        objective_state = state.get("objective")
        n_micro = batch.weights.shape[0]  # (micro-batches, examples)
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
        new = {"params": {name: p for name, p in params.items() if name not in own}, "opt_state": opt_state,
               "step": state["step"] + 1, "rng": state["rng"]}
        if own:
            new["objective_params"] = {name: params[name] for name in own}
        if stateful:
            new["objective"] = objective_state
        return new, metrics

    state_sharding = replicated(mesh) if state_sharding is None else state_sharding
    rest = place_rest(rest, mesh)
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
    with run_dir.lock_run_dir(workdir):
        return _train(cfg, workdir, resume, resume_step)


def _train(cfg: ExperimentConfig, workdir: Path, resume: bool, resume_step: int | None) -> dict[str, float]:
    mesh = make_mesh()
    t = cfg.train
    check_divisible(t.batch_size, t.grad_accum, mesh)
    check_divisible(t.eval_batch_size, 1, mesh, "train.eval_batch_size")
    ckpts, latest = run_dir.open_checkpoints(cfg, workdir, resume, resume_step)

    groups = t.grad_accum * mesh.shape[DATA_AXIS]  # blocks of a batch: one per micro-batch and device shard
    pieces, cfg = _prepare(cfg, workdir, groups, resuming=latest is not None)
    # Run in the train step beside the model, never part of it: the frozen teacher (distill.in_step) and the
    # modules the objective trains (TinyBERT's projection), whose parameters go to the train state's
    # "objective_params".
    extras = objective_modules(cfg.objective, pieces.model, pieces.teacher, t.seed)
    if pieces.teacher is not None:
        extras["teacher"] = pieces.teacher
    (eval_graphdef, eval_rest), (graphdef, params, rest) = _model_views(pieces.model, t.compute_dtype, cfg, extras)
    per_epoch = steps_per_epoch(pieces.train, t.batch_size, groups, cfg.data.environment_proportions)
    total = t.max_steps if t.max_steps is not None else math.ceil(t.epochs * per_epoch)
    tx, schedule = make_optimizer(cfg.optim, pieces.model, params, total, cfg.peft, cfg.prune)
    objective = make_objective(cfg.objective, pieces.train.environment_names)
    if cfg.objective.name in PAIR_OBJECTIVES and pieces.train.pair_ids is None:
        raise ConfigError(f"objective.name={cfg.objective.name!r} works on counterfactual pairs: set data.pair_column "
                          "to the column that pairs the training rows")
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(t.seed))}
    if any(name in params for name in extras):  # the optimizer sees one tree; the checkpoints keep the model's apart
        state["objective_params"] = {name: params[name] for name in extras if name in params}
        state["params"] = {name: p for name, p in params.items() if name not in extras}
    if isinstance(objective, StatefulObjective):
        state["objective"] = objective.init_state(params)
    sharding = state_shardings(state, mesh, t.fsdp)  # replicated, or FSDP
    state = jax.device_put(state, sharding)
    meta = {"epoch": 0, "batch": 0, "best": None, "best_step": None, "evals_since_best": 0}
    if cfg.peft.method != "none":  # the checkpoints hold the trained parameters only: say which base they fit
        meta["base_fingerprint"] = peft.fingerprint(pieces.model)
    if latest is not None:
        fresh = meta
        state, meta = ckpts.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                 state), latest)
        if meta.get("base_fingerprint") != fresh.get("base_fingerprint"):
            raise run_dir.RunError(f"--resume: checkpoint step {latest} was trained on another frozen base "
                                   f"(fingerprint {str(meta.get('base_fingerprint'))[:12]}..., this base's "
                                   f"{str(fresh.get('base_fingerprint'))[:12]}...): restore that base checkpoint")
        print(f"resumed from {workdir}/checkpoints/{latest} (epoch {meta['epoch']}, batch {meta['batch']})")
    start = int(state["step"])
    ckpts.drop_best_after(start)
    stop = Stop()
    if cfg.checkpoint.patience is not None and meta["evals_since_best"] >= cfg.checkpoint.patience:
        stop.reason = "early stopping"  # this run already stopped early: resuming it has nothing left to do
    if start >= total or stop.reason:
        print(f"{workdir} is complete (step {start} of {total}); nothing to train")

    train_step = make_train_step(graphdef, rest, objective, tx, schedule, mesh, t.compute_dtype, sharding)
    eval_step = make_eval_step(eval_graphdef, eval_rest, mesh, token_sums=cfg.model.task == "causal_lm")
    # Records after the restored step (all of them when no checkpoint was reached) are written again.
    writer = MetricWriter(workdir, resume_step=start)
    bar = tqdm(total=total, initial=start, disable=jax.process_index() != 0, desc=cfg.name, dynamic_ncols=True)
    run = Run(cfg, workdir, pieces, mesh, writer, ckpts, bar, stop, total, per_epoch, meta, state)
    evaluation = Evaluation(run, eval_step, lambda params: nnx.merge(eval_graphdef, params, eval_rest))
    hooks = [Logging(run, train_step), evaluation]
    if cfg.peft.method == "adalora":
        hooks.append(Ranks(run))
    if cfg.prune.method != "none":
        hooks.append(Sparsity(run, pruning.targets(pieces.model, cfg.prune)))
    if t.sample_prompts or t.sample_dev_examples:
        hooks.append(Samples(run, evaluation))
    hooks.append(Checkpointing(run))

    batches = _batches(cfg, pieces, mesh, meta["epoch"], meta["batch"])
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.request("SIGTERM"))
    try:
        step = start
        while step < total and not stop.reason:
            began = time.perf_counter()
            epoch, b, batch = next(batches)
            run.state, metrics = train_step(run.state, put_batch(batch, mesh, t.grad_accum))
            # One small host transfer per step: the NaN check must see every loss before any checkpoint of that
            # step is written (on CPU the step dominates; the data for the next step is ready).
            metrics = jax.device_get(metrics)
            step += 1
            _check_finite(metrics, step, epoch, b, ckpts)
            meta.update(epoch=epoch + (b + 1 == per_epoch), batch=(b + 1) % per_epoch)
            done = Step(step, metrics, batch, time.perf_counter() - began, end_of_epoch=b + 1 == per_epoch)
            for hook in hooks:
                if hook.due(done):
                    hook(done)
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        writer.close()
        ckpts.close()
    if stop.reason == "SIGTERM":
        raise Interrupted(f"SIGTERM: saved a checkpoint at step {step} of {total}; resume with --resume")
    return evaluation.last


# ------------------------------------------------------------------------------------------- set-up


def _prepare(cfg: ExperimentConfig, workdir: Path, groups: int, resuming: bool
             ) -> tuple[experiment.Pieces, ExperimentConfig]:
    """The run's pieces, and the config with its label set resolved (a causal LM and a regression have none),
    recorded in the run directory (a resumed run must be the same experiment)."""
    t = cfg.train
    pieces = experiment.prepare(run_dir.with_run_source(cfg))  # a run directory as the starting model
    if pieces.labels and cfg.model.problem_type != "regression":
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=pieces.labels))
    train_split = pieces.train
    if train_split.environments is not None and train_split.pair_ids is None:  # say what stratifying costs
        draws = oversampling(train_split.environments, len(train_split.environment_names), t.batch_size, groups,
                             cfg.data.environment_proportions)
        train_split.report.draws_per_epoch = {train_split.environment_names[e]: round(v, 3) for e, v in draws.items()}
    if cfg.distill.teacher is not None:  # its cached logits ride in the batches, or itself in the train step
        pieces.teacher = teacher.prepare_teacher(cfg, pieces, workdir, resuming)
    run_dir.record_run(workdir, cfg, pieces, resuming=resuming)
    return pieces, cfg


def _model_views(model: nnx.Module, compute_dtype: str, cfg: ExperimentConfig, extras: dict[str, nnx.Module]
                 ) -> tuple[tuple, tuple]:
    """(eval graphdef, eval rest) for evaluation (no dropout) and (graphdef, params as a pure dict, rest) for
    the train step, the graphdef's layers computing in `compute_dtype` over the float32 parameters. Under PEFT
    the params are the trained ones only; the frozen weights ride in `rest` (research/peft/attach.py). `extras`
    are attached to the train model under their names: a teacher run in the step (`distill.in_step`) rides in
    `rest` (frozen, in eval mode), an objective's own modules in `params` under their names."""
    model.eval()
    eval_graphdef, _, eval_rest = nnx.split(model, nnx.Param, ...)
    model.train()
    for name, module in extras.items():  # attached for the split only: evaluation and export never see them
        setattr(model, name, module)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    for name in extras:
        delattr(model, name)
    if compute_dtype != "float32":  # same structure, layers computing in compute_dtype
        low = dataclasses.replace(model.config, dtype=compute_dtype)
        # The same PEFT structure; its initial values do not matter (the parameters come from `model`).
        structure = dataclasses.replace(cfg.peft, init_from=None, prompt_init="random", prompt_init_text=None)
        abstract = nnx.eval_shape(lambda: peft.prepare(type(model)(low, rngs=nnx.Rngs(0)), structure, 0))
        abstract.train()
        for name, module in extras.items():  # a teacher computes in its own dtype (float32)
            setattr(abstract, name, module)
        graphdef = nnx.graphdef(abstract)
    return (eval_graphdef, eval_rest), (graphdef, nnx.to_pure_dict(params), rest)


# ------------------------------------------------------------------------------------ the loop's parts


class Stop:
    """Why the loop ends early: None, "SIGTERM" (a checkpoint of the current step is saved, then the run
    exits with EXIT_SIGTERM) or "early stopping". Every early end goes through here."""

    def __init__(self):
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason


@dataclasses.dataclass
class Step:
    """What the hooks see after a step: its number (1-based, counting from the run's start), its metrics on
    the host, the host batch, the seconds the step took (data and transfer included) and whether it ended an
    epoch."""

    step: int
    metrics: dict[str, float]
    batch: Batch
    seconds: float
    end_of_epoch: bool


@dataclasses.dataclass
class Run:
    """What the hooks share: the run's pieces, writers and state (the train state is replaced every step)."""

    cfg: ExperimentConfig
    workdir: Path
    pieces: experiment.Pieces
    mesh: Mesh
    writer: MetricWriter
    ckpts: Checkpoints
    bar: tqdm
    stop: Stop
    total: int  # the step the run ends at
    per_epoch: int
    meta: dict  # the data position and early-stopping record, checkpointed with the state
    state: dict


class Logging:
    """Every step counts towards the next record; every `train.log_every` steps (and at the last) the record:
    the mean of the steps' metrics, throughput over the steps' own time (data included, evaluation and
    checkpoints not), the epoch and the compile count."""

    def __init__(self, run: Run, train_step: TrainStep):
        self.run, self.train_step = run, train_step
        self.window, self.examples, self.tokens, self.seconds = [], 0.0, 0, 0.0

    def due(self, s: Step) -> bool:
        return True

    def __call__(self, s: Step) -> None:
        self.window.append(s.metrics)
        self.examples += float(s.batch.weights.sum())
        self.tokens += int(s.batch.attention_mask.sum())  # non-padding tokens (filler repeats included)
        self.seconds += s.seconds
        self.run.bar.update(1)
        if s.step % self.run.cfg.train.log_every and s.step != self.run.total:
            return
        logged = {k: float(np.mean([m[k] for m in self.window])) for k in self.window[0]}
        logged.update({"train/examples_per_s": self.examples / self.seconds,
                       "train/tokens_per_s": self.tokens / self.seconds, "train/epoch": s.step / self.run.per_epoch,
                       "train/compilations": self.train_step.traces})
        self.run.writer.write(s.step, logged)
        self.run.bar.set_postfix(loss=f"{logged['train/loss']:.4f}", lr=f"{logged['train/lr']:.2e}")
        self.window, self.examples, self.tokens, self.seconds = [], 0.0, 0, 0.0


class Ranks:
    """AdaLoRA: with every train-metric record, the rank each matrix keeps (`peft/rank/<layer>`) and their sum
    (`peft/rank_total`), from the optimizer state's latest allocation (research/peft/adalora.py)."""

    def __init__(self, run: Run):
        self.run = run

    def due(self, s: Step) -> bool:
        return s.step % self.run.cfg.train.log_every == 0 or s.step == self.run.total

    def __call__(self, s: Step) -> None:
        kept = peft.ranks(self.run.state["opt_state"])
        record = {f"peft/rank/{name.removesuffix('/adapter/lora_e')}": float(r) for name, r in kept.items()}
        record["peft/rank_total"] = float(sum(kept.values()))
        self.run.writer.write(s.step, record)


class Sparsity:
    """Pruning: with every train-metric record, the fraction of each pruned matrix at zero
    (`prune/sparsity/<layer>`) and over all of them (`prune/sparsity`), from the optimizer state's masks."""

    def __init__(self, run: Run, names: dict[str, str]):
        self.run, self.names = run, names

    def due(self, s: Step) -> bool:
        return s.step % self.run.cfg.train.log_every == 0 or s.step == self.run.total

    def __call__(self, s: Step) -> None:
        self.run.writer.write(s.step, pruning.sparsity_record(pruning.masks_of(self.run.state["opt_state"]),
                                                              self.names))


class Evaluation:
    """Every `train.eval_every` steps (each epoch's end when None) and at the last step: dev and test metrics,
    the best checkpoint (`checkpoint.best_metric`), and early stopping after `checkpoint.patience` evaluations
    without improvement."""

    def __init__(self, run: Run, eval_step: Callable, model_of: Callable[[dict], nnx.Module]):
        self.run, self.eval_step, self.model_of = run, eval_step, model_of
        self.last: dict[str, float] = {}

    def due(self, s: Step) -> bool:
        every = self.run.cfg.train.eval_every
        return s.step == self.run.total or (s.step % every == 0 if every else s.end_of_epoch)

    def __call__(self, s: Step) -> None:
        r, t = self.run, self.run.cfg.train
        metrics, reports = evaluate_splits(r.cfg.model.task, self.eval_step, r.state["params"], r.pieces,
                                           t.eval_batch_size, r.cfg.data.buckets, r.mesh)
        for prefix, report in reports.items():
            r.writer.write_text(s.step, f"{prefix}/report", report)
        r.writer.write(s.step, metrics)
        tqdm.write(f"step {s.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                  if k.startswith("dev/") or k.endswith("/accuracy")))
        self.last = metrics
        c = r.cfg.checkpoint
        if _track_best(r.ckpts, c, r.meta, s.step, r.state["params"], metrics):
            tqdm.write(f"early stopping at step {s.step}: no {c.best_metric} improvement in {c.patience} "
                       f"evaluations (best {r.meta['best']:.4f} at step {r.meta['best_step']})")
            r.stop.request("early stopping")


class Samples:
    """With each evaluation of a language model: greedy continuations of `train.sample_prompts` and of the
    first `train.sample_dev_examples` dev dialogue contexts (beside their reference responses), in
    samples.jsonl and TensorBoard's text tab."""

    def __init__(self, run: Run, evaluation: Evaluation):
        self.run, self.evaluation = run, evaluation
        self.path = run.workdir / "samples.jsonl"
        if jax.process_index() == 0:
            trim_jsonl(self.path, int(run.state["step"]))  # as metrics.jsonl: what follows the restored step goes

    def due(self, s: Step) -> bool:
        return jax.process_index() == 0 and self.evaluation.due(s)

    def __call__(self, s: Step) -> None:
        r, t = self.run, self.run.cfg.train
        n, dev = t.sample_dev_examples, r.pieces.dev
        prompts = [*t.sample_prompts, *dev.texts[:n]]
        responses = dev.responses if isinstance(dev, DialogueSplit) else []
        references = [None] * len(t.sample_prompts) + responses[:n]
        texts = complete(self.evaluation.model_of(r.state["params"]), r.pieces.tokenizer, prompts,
                         max_new_tokens=t.sample_tokens)
        shown = []
        with self.path.open("a") as f:
            for prompt, text, reference in zip(prompts, texts, references, strict=True):
                record = {"step": s.step, "prompt": prompt, "text": text}
                shown.append(f"{prompt}{text}")
                if reference is not None:
                    record["reference"] = reference
                    shown[-1] += f"\n[reference: {reference}]"
                f.write(json.dumps(record) + "\n")
        r.writer.write_text(s.step, "samples", "\n\n".join(shown))


class Checkpointing:
    """Every `checkpoint.every_steps` steps, at the last step, and whenever the run stops early (SIGTERM: no
    step lost; early stopping: a resume knows it is done)."""

    def __init__(self, run: Run):
        self.run = run

    def due(self, s: Step) -> bool:
        r = self.run
        return s.step % r.cfg.checkpoint.every_steps == 0 or s.step == r.total or r.stop.reason is not None

    def __call__(self, s: Step) -> None:
        self.run.writer.flush()
        self.run.ckpts.save(s.step, self.run.state, self.run.meta)


def _batches(cfg: ExperimentConfig, pieces: experiment.Pieces, mesh: Mesh, epoch: int, first_batch: int
             ) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, batch index, batch) from the data position on, epoch after epoch."""
    t, d = cfg.train, cfg.data
    while True:
        for b, batch in epoch_batches(pieces.train, t.batch_size, d.buckets, pieces.pad_id, t.seed, epoch,
                                      first_batch, pack_length=d.pack_length, micro_batches=t.grad_accum,
                                      shards=mesh.shape[DATA_AXIS], proportions=d.environment_proportions):
            yield epoch, b, batch
        epoch, first_batch = epoch + 1, 0


def _check_finite(metrics: dict, step: int, epoch: int, b: int, ckpts: Checkpoints) -> None:
    if not (np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/grad_norm"])):
        last = ckpts.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss {metrics['train/loss']} (grad norm {metrics['train/grad_norm']}) at step "
            f"{step} (epoch {epoch}, batch {b}); nothing was saved for it "
            f"({f'the last checkpoint is step {last}' if last is not None else 'no checkpoint yet'}). "
            "Lower optim.lr, check the data, or use train.compute_dtype=float32")


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
