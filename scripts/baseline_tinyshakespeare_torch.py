"""experiments/tinyshakespeare_gpt2.py's recipe written with PyTorch + transformers, for the side-by-side.

    python scripts/baseline_tinyshakespeare_torch.py --seed 0 --out runs/torch_tinyshakespeare_s0.json

The same data, read by our own reader so that both sides see exactly the same windows (research/data/lm.py:
Tiny Shakespeare's first 90% of characters trains and the last 10% validates, GPT-2's BPE from the data root,
windows of 256 tokens sharing one token, each token but the first predicted once, the last window padded
and masked). The same model and recipe: `GPT2LMHeadModel` with random weights, 6 layers, 6 heads, 384 wide,
256 positions, dropout 0.1; batch 16 windows, AdamW lr 6e-4, betas 0.9/0.95, weight decay 0.1 (not on biases
and LayerNorm weights, as our optimizer), linear warmup over 6% of the steps then cosine decay to 0, clipping
at 1.0, 2 epochs, dev perplexity every 25 steps and at the end (exp of the mean next-token cross-entropy over
every dev target). A plain loop over shuffled windows, as a PyTorch user writes it; transformers' own loss
(labels = the input ids, -100 on padding; the model shifts them).

Prints progress and, as its last line, one JSON object: the final dev perplexity, every evaluation, the median
step time, the train time and the wall time (imports included).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import get_cosine_schedule_with_warmup  # noqa: E402

from research.config import load_experiment  # noqa: E402
from research.data.lm import load_split  # noqa: E402
from research.models import load_tokenizer  # noqa: E402

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "tinyshakespeare_gpt2.py"


def padded(windows: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels with -100 on padding), each (B, length)."""
    ids = torch.zeros(len(windows), length, dtype=torch.long)
    mask = torch.zeros(len(windows), length, dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, : len(w)] = torch.from_numpy(w.astype(np.int64))
        mask[row, : len(w)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


@torch.no_grad()
def perplexity(model, windows: list[np.ndarray], length: int, batch_size: int = 32) -> float:
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids, mask, labels = padded(windows[start : start + batch_size], length)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       ignore_index=-100, reduction="sum"))
        count += int((targets != -100).sum())
    model.train()
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (for timing); default: 2 epochs")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()
    cfg = load_experiment(EXPERIMENT)
    d, t, o = cfg.data, cfg.train, cfg.optim
    tokenizer = load_tokenizer(os.path.join(os.environ.get("RESEARCH_DATA_DIR", "../shared/data"), "tokenizers",
                                            "gpt2"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    train_windows = load_split(d, "train", tokenizer, eos).input_ids
    dev_windows = load_split(d, "dev", tokenizer, eos).input_ids
    torch.manual_seed(args.seed)
    overrides = cfg.model.overrides
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=overrides["n_positions"], n_embd=overrides["n_embd"],
        n_layer=overrides["n_layer"], n_head=overrides["n_head"], attn_implementation="sdpa"))
    model.train()

    steps_per_epoch = math.ceil(len(train_windows) / t.batch_size)
    total = math.ceil(t.epochs * steps_per_epoch)
    total = min(total, args.max_steps) if args.max_steps else total
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or ".ln_" in n or "ln_f" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or ".ln_" in n or "ln_f" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(o.warmup_ratio * total), total)

    generator = torch.Generator().manual_seed(args.seed)
    order = [i for _ in range(math.ceil(t.epochs)) for i in torch.randperm(len(train_windows), generator=generator)]
    t_train = time.perf_counter()
    evals, step_times = [], []
    for step in range(1, total + 1):
        began = time.perf_counter()
        chosen = order[(step - 1) * t.batch_size : step * t.batch_size]
        ids, mask, labels = padded([train_windows[i] for i in chosen], d.max_length)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - began)
        if step % t.log_every == 0:
            print(f"step {step}/{total} loss {loss.item():.4f} ({step_times[-1]:.2f} s/step)", flush=True)
        if step % t.eval_every == 0 or step == total:
            evals.append({"step": step, "dev/perplexity": perplexity(model, dev_windows, d.max_length)})
            print(f"step {step}: dev perplexity {evals[-1]['dev/perplexity']:.1f}", flush=True)
    train_s = time.perf_counter() - t_train
    result = {
        "framework": "pytorch", "seed": args.seed, "steps": total, "dev_perplexity": evals[-1]["dev/perplexity"],
        "evals": evals, "median_step_s": round(float(np.median(step_times)), 3), "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - T_START, 1), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
