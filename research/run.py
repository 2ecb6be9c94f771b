"""The run directory: what a run writes beside its checkpoints, and what one does with a finished run.

    <workdir>/.lock              held by the live run (process 0): a second run there is refused
    <workdir>/config.json        the resolved config + provenance (package versions, git commit, devices, command)
    <workdir>/data_report.json   what became of every row of every split
    <workdir>/metrics.jsonl      one record per logged step (research/metrics.py), TensorBoard beside it
    <workdir>/checkpoints/       research/checkpoint.py: `params` apart from the rest of the train state
    <workdir>/best/              the best evaluation's parameters
    <workdir>/peft.json          under PEFT: the method, the layers it attached to, what trains, parameter
                                 counts, and the fingerprint of the frozen base the checkpoints belong to

Opening a run for training (`open_checkpoints`: refuse to train over a run without --resume, resume from an
older step on request), recording it (`record_run`: a resumed run must be the same experiment), and reading a
finished one back: `load_trained_model` restores the parameters alone (no optimizer, no objective), which
`research eval` (`evaluate_run`) and `research export` use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
from flax import nnx

from research import peft
from research.attacks import char_attack, pgd_accuracy
from research.checkpoint import Checkpoints
from research.config import ConfigError, ExperimentConfig, from_dict
from research.evaluate import evaluate_splits, make_eval_step
from research.experiment import Pieces, build_model, prepare
from research.metrics import MetricWriter, read_records
from research.models import save_pretrained
from research.objectives import objective_options
from research.sharding import make_mesh, replicated


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (e.g. training over an existing run without --resume)."""


class RunDirBusyError(RuntimeError):
    """Another live run holds the run directory."""


@contextlib.contextmanager
def lock_run_dir(workdir: Path) -> Iterator[None]:
    """Hold `<workdir>/.lock` for the whole run (process 0): a second run writing the same directory would
    interleave checkpoints and metrics, so it is refused. The OS drops the lock when the process dies, so a
    killed run leaves no stale lock behind."""
    if jax.process_index() != 0:
        yield
        return
    path = workdir / ".lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirBusyError(f"{workdir} is in use by another run (process {owner} holds {path}); wait for it to "
                              "finish or choose another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def provenance() -> dict:
    packages = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tokenizers", "safetensors", "research"]
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    root = Path(__file__).resolve().parent.parent
    git = {}
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode == 0:
            git = {"commit": head.stdout.strip(), "dirty": bool(run("status", "--porcelain").stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "git": git or None,
        "devices": [str(d) for d in jax.devices()],
        "processes": jax.process_count(),
        "command": sys.argv,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def normalized(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with the objective's default options filled in: how configs are compared and recorded."""
    objective = dataclasses.replace(cfg.objective, params=objective_options(cfg.objective))
    return dataclasses.replace(cfg, objective=objective)


def write_run_config(workdir: Path, cfg: ExperimentConfig) -> None:
    record = normalized(cfg).to_dict()
    record["provenance"] = provenance()
    (workdir / "config.json").write_text(json.dumps(record, indent=2) + "\n")


def read_run_config(workdir: Path) -> ExperimentConfig:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a run directory")
    record = json.loads(path.read_text())
    record.pop("provenance", None)
    return from_dict(ExperimentConfig, record)


def open_checkpoints(cfg: ExperimentConfig, workdir: Path, resume: bool, resume_step: int | None
                     ) -> tuple[Checkpoints, int | None]:
    """The run's checkpoints and the step to resume from (None: a fresh run). Training into a directory that
    holds checkpoints needs --resume; `resume_step` resumes from that older checkpoint, deleting the later ones
    (e.g. after the latest failed verification)."""
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
    return ckpts, latest


def record_run(workdir: Path, cfg: ExperimentConfig, pieces: Pieces, resuming: bool) -> None:
    """Write config.json and data_report.json; when resuming, refuse a config that differs from the run's."""
    if resuming and (workdir / "config.json").exists():
        saved = read_run_config(workdir)
        if normalized(saved) != normalized(cfg):
            a, b = normalized(saved).to_dict(), normalized(cfg).to_dict()
            diff = [f"{g}.{k}: {a[g][k]!r} -> {b[g][k]!r}" for g in a if isinstance(a[g], dict)
                    for k in a[g] if a[g][k] != b[g][k]]
            raise RunError(f"--resume with a config that differs from {workdir}/config.json ({'; '.join(diff)}); "
                           "a resumed run must be the same experiment: start a new --workdir instead")
    if cfg.peft.method != "none":
        described = peft.describe(pieces.model)
        if resuming and (workdir / "peft.json").exists():
            check_base(workdir, pieces.model, "--resume")
        where = (f"{described['virtual_tokens']} virtual tokens" if described["virtual_tokens"] else
                 f"{len(described['layers'])} layers ({', '.join(described['layers'])})")
        print(f"peft: {described['method']} on {where}; trained in full: {described['modules_to_save']}; "
              f"{described['trained_parameters']:,} trained parameters ({described['trained_percent']:.3g}% of the "
              "model)")
    if jax.process_index() != 0:
        return
    if not resuming:
        write_run_config(workdir, cfg)
        if cfg.peft.method != "none":
            (workdir / "peft.json").write_text(json.dumps(described, indent=2) + "\n")
    splits = (pieces.train, pieces.dev, *pieces.tests.values())
    reports = {s.name: dataclasses.asdict(s.report) for s in splits}
    (workdir / "data_report.json").write_text(json.dumps(reports, indent=2) + "\n")
    for s in splits:
        print(f"data {s.report.summary()}")


def check_base(workdir: Path, model: nnx.Module, what: str) -> None:
    """Under PEFT the checkpoints hold the trained parameters alone: refuse to combine them with any base but
    the one they were trained on (peft.json's fingerprint of the frozen weights)."""
    path = workdir / "peft.json"
    if not path.exists():
        return
    recorded = json.loads(path.read_text())["base_fingerprint"]
    found = peft.fingerprint(model)
    if found != recorded:
        raise RunError(f"{what}: the frozen base weights built from config.json's model.name_or_path differ from the "
                       f"ones {workdir} was trained on (fingerprint {found[:12]}... != {recorded[:12]}... in {path}); "
                       "its checkpoints hold only the trained parameters and fit that base alone: restore the "
                       "original base checkpoint")


# ------------------------------------------------------------------------------------ a finished run


def load_trained_model(workdir: Path, which: str = "best", quantization_aware: bool = True
                       ) -> tuple[nnx.Module, int, str]:
    """The model of a run directory with the parameters of its best (or latest) checkpoint, in eval mode (a
    quantization-aware run's computing quantized, unless `quantization_aware` is False)."""
    cfg = read_run_config(workdir)
    model = build_model(with_run_source(cfg), cfg.data.labels, init_adapter=False,
                        quantization_aware=quantization_aware)
    return model, restore_params(workdir, cfg, model, which), which


def is_run_dir(path: str) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / "checkpoints").is_dir()


def run_as_checkpoint(workdir: Path, which: str = "best") -> Path:
    """A run directory's checkpoint exported once as a Hugging Face directory (weights, config and tokenizer
    files), so a run can be where a new one starts: e.g. a distillation student built from a fine-tuned
    teacher's layers. Kept under $XDG_CACHE_HOME/research/run_exports, named by a hash of the checkpoint's
    manifest (its files' sha256 digests): a retrained run exports afresh."""
    from research.checkpoint import MANIFEST

    cfg = read_run_config(workdir)
    if cfg.peft.method != "none" or cfg.qat.method != "none":
        raise ConfigError(f"model.name_or_path: run {workdir} is a PEFT or quantization-aware run; start from a "
                          "plain run, or export it (research export --merged) and start from that directory")
    _, step, _ = load_trained_model(workdir, which)
    # The checkpoint restored: best/<step> when the run keeps a best one, else checkpoints/<step>.
    manifest = next(p for p in (workdir / "best" / str(step) / MANIFEST, workdir / "checkpoints" / str(step) / MANIFEST)
                    if p.is_file())
    key = hashlib.sha256(f"{workdir.resolve()}:{step}:".encode() + manifest.read_bytes()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    out = Path(base) / "research" / "run_exports" / key
    if not (out / "model.safetensors").is_file():
        partial = out.with_name(f"{key}.{os.getpid()}.partial")
        export_run(workdir, partial, which)
        partial.replace(out)  # whole or absent
    return out


def with_run_source(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` to build from: a run directory in model.name_or_path replaced by its best checkpoint's export
    (`run_as_checkpoint`). Runs record the config as written; every place that builds a model from a config
    passes it through here first."""
    if not is_run_dir(cfg.model.name_or_path):
        return cfg
    source = str(run_as_checkpoint(Path(cfg.model.name_or_path)))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=source))


def restore_params(workdir: Path, cfg: ExperimentConfig, model: nnx.Module, which: str = "best") -> int:
    """Put the best (or latest) checkpoint's parameters into `model` (eval mode); returns the step. Only the
    parameters are read: no optimizer or objective is built to describe the rest of the state."""
    check_base(Path(workdir), model, f"restoring {which}")
    mesh = make_mesh()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), params)
    c = cfg.checkpoint
    ckpts = Checkpoints(workdir, c.keep, c.best_metric, c.best_mode)
    try:
        if which == "best":
            if c.best_metric is None:
                raise FileNotFoundError(f"{workdir} keeps no best checkpoint (checkpoint.best_metric is None); "
                                        "use --checkpoint latest")
            params, step = ckpts.restore_best(abstract)
        else:
            if ckpts.latest_step() is None:
                raise FileNotFoundError(f"{workdir}/checkpoints holds no complete checkpoint")
            params, step = ckpts.restore_params(abstract)
    finally:
        ckpts.close()
    param_state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(param_state, params)
    nnx.update(model, param_state)
    model.eval()
    return step


def export_run(workdir: Path, out_dir: Path, which: str = "best", merged: bool = False) -> str:
    """Write a run's checkpoint for PyTorch; returns what was written. A plain run: a transformers directory. A
    PEFT run: the adapter in peft's format (`peft.PeftModel.from_pretrained(base, out_dir)` loads it), or with
    `merged` a transformers directory with the update folded into the weights (LoRA, IA3). A quantization-aware
    run: its quantized model (research/compress/quantize.py's export: dequantized weights for transformers, and
    the codes and scales)."""
    cfg = read_run_config(workdir)
    model, step, which = load_trained_model(workdir, which, quantization_aware=False)
    if cfg.qat.method != "none":
        from research.compress import quantize

        about = quantize.export_quantized(quantize.quantize(model, cfg.qat.method, cfg.qat.targets), model, out_dir,
                                          cfg.qat.method, cfg.qat.targets)
        what = f"{cfg.qat.method}-quantized: {about['bytes']:,} bytes of weights against {about['float32_bytes']:,}"
    elif cfg.peft.method == "none" or merged:
        plain = peft.merged_model(model) if cfg.peft.method != "none" else model
        save_pretrained(plain, out_dir)
        folded = f", the {cfg.peft.method} update folded in" if cfg.peft.method != "none" else ""
        what = "Hugging Face format" + folded
        if cfg.peft.base_quantization != "none":
            what += " (into the dequantized NF4 weights; " + _merge_gap(cfg, model, plain) + ")"
    else:
        base = getattr(model, "hf_source", cfg.model.name_or_path)
        trained = [r["step"] for r in read_records(workdir) if "train/loss" in r]  # AdaLoRA's total_step
        peft.save_adapter(model, cfg.peft, out_dir, base_name_or_path=base, total_steps=max(trained, default=None))
        what = f"a {cfg.peft.method} adapter in peft's format; its base: {getattr(model, 'hf_source', '?')}"
    return f"exported the {which} checkpoint (step {step}) of {workdir} to {out_dir} ({what})"


def _merge_gap(cfg: ExperimentConfig, model: nnx.Module, merged: nnx.Module) -> str:
    """How far a QLoRA model's merged export computes from it: the largest logit difference on the dev split."""
    if cfg.model.task != "sequence_classification":
        return f"the logit difference is measured for sequence classification, not {cfg.model.task!r}"
    from research.evaluate import predict

    pieces = prepare(with_run_source(cfg), with_train=False, init_adapter=False)
    mesh = make_mesh()
    logits = []
    for m in (model, merged):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        logits.append(predict(make_eval_step(graphdef, rest, mesh), params, pieces.dev, cfg.train.eval_batch_size,
                              cfg.data.buckets, pieces.pad_id, mesh))
    gap = float(abs(logits[0] - logits[1]).max())
    return f"largest |logit difference| from the NF4 base + LoRA on the {len(pieces.dev)} dev examples: {gap:.2e}"


def quantize_run(workdir: Path, out_dir: Path, method: str, which: str = "best", targets: tuple[str, ...] = ()
                 ) -> tuple[dict, str]:
    """Post-training quantization of a run's checkpoint (research/compress/quantize.py): the quantized model's
    export in `out_dir`, and its dev metrics beside the float model's (in quantization.json too)."""
    from research.compress import quantize

    cfg = read_run_config(workdir)
    pieces = prepare(with_run_source(cfg), with_train=False, init_adapter=False)
    if cfg.peft.method != "none" or cfg.qat.method != "none":
        raise RunError(f"research quantize: {workdir} is a {cfg.peft.method if cfg.peft.method != 'none' else 'qat'} "
                       "run; quantize a plain fine-tuned run (a quantization-aware run exports quantized already)")
    step = restore_params(workdir, cfg, pieces.model, which)
    qmodel = quantize.quantize(pieces.model, method, targets)
    mesh = make_mesh()
    found = {}
    for name, model in (("float32", pieces.model), (method, qmodel)):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        eval_step = make_eval_step(graphdef, rest, mesh, token_sums=cfg.model.task == "causal_lm")
        metrics, _ = evaluate_splits(cfg.model.task, eval_step, params, pieces, cfg.train.eval_batch_size,
                                     cfg.data.buckets, mesh)
        found[name] = {k: v for k, v in metrics.items() if k.startswith("dev/")}
    about = quantize.export_quantized(qmodel, pieces.model, out_dir, method, targets)
    about.update(run=str(workdir), checkpoint=which, step=step, dev=found)
    (Path(out_dir) / "quantization.json").write_text(json.dumps(about, indent=2) + "\n")
    lines = [f"{name}: " + ", ".join(f"{k.removeprefix('dev/')} {v:.4f}" for k, v in m.items() if "loss" not in k)
             for name, m in found.items()]
    return about, (f"{method} quantization of the {which} checkpoint (step {step}) of {workdir}, written to {out_dir}: "
                   f"{about['bytes']:,} bytes of weights against {about['float32_bytes']:,}\n" + "\n".join(lines))


def prune_run(workdir: Path, out_dir: Path, heads: float | None = None, neurons: float | None = None,
              examples: int = 2048, which: str = "best") -> tuple[dict, str]:
    """Structured pruning of a run's checkpoint (research/compress/structured.py): Michel et al.'s importance on
    `examples` training examples, the least important `heads` and `neurons` fractions removed, the smaller model
    written to `out_dir` (with pruning.json: importances, what was pruned, dev metrics before and after)."""
    from research.compress import structured

    if heads is None and neurons is None:
        raise RunError("research prune: say what to prune, --heads and/or --neurons (a fraction in (0, 1))")
    cfg = read_run_config(workdir)
    if cfg.peft.method != "none" or cfg.qat.method != "none":
        raise RunError(f"research prune: {workdir} is a PEFT or quantization-aware run; prune a plain one")
    pieces = prepare(with_run_source(cfg), with_train=True, init_adapter=False)
    step = restore_params(workdir, cfg, pieces.model, which)
    config = pieces.model.config
    head_importance, neuron_importance = structured.importance(pieces.model, pieces.train, examples, pieces.pad_id,
                                                               cfg.train.seed)
    pruned_heads = structured.units_to_prune(head_importance, heads, dict(config.pruned_heads)) if heads else {}
    pruned_neurons = (structured.units_to_prune(neuron_importance, neurons, dict(config.pruned_neurons))
                      if neurons else {})
    small = structured.prune(pieces.model, pruned_heads, pruned_neurons, cfg.model.task)
    mesh = make_mesh()
    found = {}
    for name, model in (("before", pieces.model), ("after", small)):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        eval_step = make_eval_step(graphdef, rest, mesh, token_sums=cfg.model.task == "causal_lm")
        metrics, _ = evaluate_splits(cfg.model.task, eval_step, params, pieces, cfg.train.eval_batch_size,
                                     cfg.data.buckets, mesh)
        found[name] = {k: v for k, v in metrics.items() if k.startswith("dev/")}
    save_pretrained(small, out_dir)
    n_heads = lambda m: structured.unit_counts(m.config)[0]  # noqa: E731
    n_neurons = lambda m: structured.unit_counts(m.config)[1]  # noqa: E731
    about = {"run": str(workdir), "checkpoint": which, "step": step, "heads": heads, "neurons": neurons,
             "examples": examples, "head_importance": [list(map(float, i)) for i in head_importance],
             "pruned_heads": {str(k): v for k, v in pruned_heads.items()},
             "pruned_neurons": {str(k): v for k, v in pruned_neurons.items()},
             "heads_before": n_heads(pieces.model), "heads_after": n_heads(small),
             "neurons_before": n_neurons(pieces.model), "neurons_after": n_neurons(small), "dev": found}
    (Path(out_dir) / "pruning.json").write_text(json.dumps(about, indent=2) + "\n")
    lines = [f"{name}: " + ", ".join(f"{k.removeprefix('dev/')} {v:.4f}" for k, v in m.items() if "loss" not in k)
             for name, m in found.items()]
    return about, (f"pruned {about['heads_before'] - about['heads_after']} of {about['heads_before']} heads and "
                   f"{about['neurons_before'] - about['neurons_after']} of {about['neurons_before']} MLP neurons of "
                   f"the {which} checkpoint (step {step}) of {workdir}, written to {out_dir}\n" + "\n".join(lines))


def evaluate_config(cfg: ExperimentConfig) -> tuple[dict[str, float], str]:
    """Evaluate an experiment's model as its config builds it (pretrained weights, no training) on the dev
    split and every data.test set: e.g. a GPT-2 checkpoint's WikiText-2 perplexity."""
    pieces = prepare(with_run_source(cfg), with_train=False)
    mesh = make_mesh()
    graphdef, params, rest = nnx.split(pieces.model, nnx.Param, ...)
    eval_step = make_eval_step(graphdef, rest, mesh, token_sums=cfg.model.task == "causal_lm")
    scalars, reports = evaluate_splits(cfg.model.task, eval_step, params, pieces, cfg.train.eval_batch_size,
                                       cfg.data.buckets, mesh)
    return scalars, f"{cfg.model.name_or_path}, no training:\n" + "\n".join(f"{p}:\n{r}" for p, r in reports.items())


def evaluate_run(workdir: Path, which: str = "best", attacks: tuple[str, ...] = (),
                 epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0), max_words: int = 5
                 ) -> tuple[dict[str, float], str]:
    """Evaluate a run's checkpoint on its dev split; the scalars are appended to the run's metrics.jsonl
    (and TensorBoard) as `eval_<which>/...` at the checkpoint's step. `attacks` adds robustness numbers
    (research/attacks.py): "pgd" (embedding-space PGD at each of `epsilons`) and "char" (character edits
    to at most `max_words` salient words)."""
    unknown = set(attacks) - {"pgd", "char"}
    if unknown:
        raise ValueError(f"unknown attack(s) {sorted(unknown)}; choose from ['char', 'pgd']")
    cfg = read_run_config(workdir)
    if attacks and cfg.model.problem_type == "regression":
        raise ValueError(f"{workdir} is a regression: the attacks count examples whose predicted class flips, and "
                         "a score has no class; evaluate it without --attack")
    # tokenizer, checked dev split, model: as trained
    pieces = prepare(with_run_source(cfg), with_train=False, init_adapter=False)
    step = restore_params(workdir, cfg, pieces.model, which)
    mesh = make_mesh()
    graphdef, params, rest = nnx.split(pieces.model, nnx.Param, ...)
    eval_step = make_eval_step(graphdef, rest, mesh, token_sums=cfg.model.task == "causal_lm")
    found, reports = evaluate_splits(cfg.model.task, eval_step, params, pieces, cfg.train.eval_batch_size,
                                     cfg.data.buckets, mesh)
    # Dev's metrics as eval_best/accuracy, ..., each test set's under its name: eval_best/<set>/accuracy, ...
    scalars = {k.removeprefix("dev/"): v for k, v in found.items()}
    report = reports["dev"]
    if "pgd" in attacks:
        for eps, acc in pgd_accuracy(pieces.model, pieces.dev, tuple(epsilons), cfg.train.eval_batch_size,
                                     cfg.data.buckets, pieces.pad_id).items():
            scalars[f"pgd_eps{eps:g}/accuracy"] = acc
    if "char" in attacks:
        result = char_attack(pieces.model, pieces.tokenizer, pieces.dev, cfg.data.max_length, cfg.data.buckets,
                             pieces.pad_id, max_words=max_words, batch_size=cfg.train.eval_batch_size,
                             seed=cfg.train.seed)
        scalars.update({f"char_attack/{k}": v for k, v in result.items()})
    metrics = {f"eval_{which}/{k}": v for k, v in scalars.items()}
    writer = MetricWriter(workdir)
    writer.write(step, metrics)
    writer.close()
    return metrics, f"{which} checkpoint (step {step}) on {pieces.dev.report.source}:\n{report}"
