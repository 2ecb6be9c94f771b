"""Compressing a fine-tuned all-MiniLM-L6-v2 on SST-2: distilled students, pruning, quantization-aware
training (research/compress/), 3 seeds, through `research sweep`; post-training quantization and head pruning
of the teacher, and every model's size and CPU latency, by scripts/bench_compress.py.

    research train experiments/sst2_minilm.py --workdir runs/compress_teacher     # the teacher (seed 0), ~10 min
    research sweep experiments/compress_sst2.py --seeds 0 1 2     # the record: experiments/results/compress/
    python scripts/bench_compress.py --teacher runs/compress_teacher --runs runs/sweeps/compress_sst2
    research train experiments/compress_sst2.py --set ... --workdir runs/x        # one run by hand

Recipe: sst2_minilm.py's (max length 64, batch 32, AdamW lr 5e-5, weight decay 0.01, warmup 6% then linear
decay, clipping at 1.0, one epoch: 2,105 steps, packed batches; dev accuracy every 500 steps), the teacher that
recipe's seed-0 run (dev 0.892 in the PEFT study's record). The variants, each at its paper's usual setting
where one epoch allows it:

    student3            3 layers: the fine-tuned teacher's layers 0, 2, 4 and its head (DistilBERT's initialization,
                        from the teacher's run directory), cross-entropy
    student3_kd         the same, with Hinton et al.'s logit distillation from the teacher (alpha 0.5, T 2;
                        DistilBERT's temperature), its logits cached
    student3_tinybert   the same, with TinyBERT's hidden-state (through its learned projection W_h, trained
                        beside the student and dropped at the end) and attention-score losses beside the logit
                        term, uniform layer map (student m <- teacher 2m), the teacher in the step
    magnitude50/90      full fine-tuning with magnitude pruning of the encoder's linear layers to 50% / 90%,
                        Zhu & Gupta's cubic schedule over the first 70% of training, masks every 10 steps
    movement50/90       the same with movement pruning (Sanh et al.), scores at lr 1e-2
    qat_int8            quantization-aware training: int8 weights and activations in the forward pass

The record keeps, per run: final and best dev accuracy, the parameters a dense model of it holds and those not
pruned, and the size of its weights on disk. Latency at batch 1 and 32 (median of repeated jitted calls, the
same machine and run for every model), post-training int8 / int8-weights / int4 / NF4 quantization and
head pruning to half the heads (Michel et al.) of the teacher are scripts/bench_compress.py's.

The PyTorch side: `python scripts/baseline_sst2_torch.py --kd runs/compress_teacher_hf --seed N` (the teacher
exported by `research export runs/compress_teacher runs/compress_teacher_hf`) is student3_kd's recipe in
PyTorch, and scripts/bench_compress.py measures `torch.ao.quantization.quantize_dynamic` int8 beside ours.

Expected, from the papers (BERT-base there, MiniLM-L6 here, one epoch): a 3-layer student a point or two below
the teacher, logit KD recovering part of that (DistilBERT keeps 97% of BERT's GLUE score with half the layers),
TinyBERT's intermediate losses more; magnitude pruning close to the teacher at 50% and further behind at 90%,
where movement pruning should do better (Sanh et al.: the gap opens at high sparsity, given enough training);
int8 (QAT or PTQ) within half a point. Measured: experiments/results/compress/README.md.
"""

import dataclasses
from pathlib import Path

from research.config import ExperimentConfig, load_experiment_module

RESULTS = "compress"  # experiments/results/compress/
SST2 = load_experiment_module(Path(__file__).with_name("sst2_minilm.py"))
TEACHER = "runs/compress_teacher"  # research train experiments/sst2_minilm.py --workdir runs/compress_teacher


def get_config() -> ExperimentConfig:
    """sst2_minilm.py's recipe, under this study's name."""
    return dataclasses.replace(SST2.get_config(), name="compress_sst2")


STUDENT = {"model.name_or_path": TEACHER, "model.layers": [0, 2, 4]}  # the fine-tuned teacher's layers
KD = {"objective.name": "kd", "objective.params": {"alpha": 0.5, "temperature": 2.0}, "distill.teacher": TEACHER}
TINYBERT = {"objective.name": "tinybert", "objective.params": {"alpha": 1.0, "temperature": 1.0},
            "distill.teacher": TEACHER, "distill.in_step": True}
PRUNE = {"prune.end": 0.7, "prune.frequency": 10}

VARIANTS = {
    "student3": STUDENT,
    "student3_kd": {**STUDENT, **KD},
    "student3_tinybert": {**STUDENT, **TINYBERT},
    "magnitude50": {"prune.method": "magnitude", "prune.sparsity": 0.5, **PRUNE},
    "magnitude90": {"prune.method": "magnitude", "prune.sparsity": 0.9, **PRUNE},
    "movement50": {"prune.method": "movement", "prune.sparsity": 0.5, **PRUNE},
    "movement90": {"prune.method": "movement", "prune.sparsity": 0.9, **PRUNE},
    "qat_int8": {"qat.method": "int8"},
}


def summarize(workdir: Path) -> dict:
    """Final and best dev accuracy, the parameters a dense copy holds and those not pruned, the weights' size."""
    import numpy as np
    from flax import nnx

    from research.metrics import read_records
    from research.run import load_trained_model

    dev = [r["dev/accuracy"] for r in read_records(workdir) if "dev/accuracy" in r]
    model, _, _ = load_trained_model(workdir, "latest", quantization_aware=False)
    arrays = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    last = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    size = sum(p.stat().st_size for p in (workdir / "checkpoints" / str(last) / "params").rglob("*") if p.is_file())
    return {"accuracy": dev[-1], "best_accuracy": max(dev), "parameters": sum(a.size for a in arrays),
            "nonzero_parameters": int(sum(np.count_nonzero(a) for a in arrays)), "checkpoint_params_bytes": size}


def table(results: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    from research.sweep import mean_std

    header = ["variant", "dev accuracy", "best dev accuracy", "parameters", "nonzero", "checkpoint params", "seeds"]
    rows = []
    for name, rs in results.items():
        r = rs[0]
        rows.append([name, mean_std([x["accuracy"] for x in rs]), mean_std([x["best_accuracy"] for x in rs]),
                     f"{r['parameters']:,}", f"{r['nonzero_parameters'] / r['parameters']:.1%}",
                     f"{r['checkpoint_params_bytes'] / 1e6:.1f} MB", str(len(rs))])
    return header, rows
