"""BERT-base (110M) sequence-classification train step, JAX (our jit step) next to PyTorch eager.

    python scripts/bench_train_step.py [--batch 8] [--length 128] [--steps 10]

Both sides: float32, the same random weights (bert-base-uncased config) and the same inputs, dropout on,
cross-entropy, backward, global-norm clipping at 1.0 and an AdamW update (torch: the fused-free default
`torch.optim.AdamW`, i.e. foreach). Each framework also times a large float32 matmul (4096^3) in the same run,
so the step's achieved FLOP/s can be set against what this machine's matmul reaches. Step FLOPs are XLA's
cost analysis of the compiled JAX step (the same count serves both).

The last line printed is one JSON object with at least `jax_step_s`, `torch_step_s` and `ratio`
(torch time / JAX time: above 1 means JAX is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import BertConfig as HFBertConfig
from transformers import BertForSequenceClassification

from research.config import OptimConfig
from research.models import from_pretrained
from research.objectives.supervised import CrossEntropyOptions, cross_entropy
from research.optim import make_optimizer
from research.sharding import make_mesh, put_batch, replicated
from research.train import make_train_step


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_flops(n: int = 4096) -> tuple[float, float]:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax_s = median_time(lambda: f(a).block_until_ready(), 5)
    t = torch.ones(n, n)
    torch_s = median_time(lambda: t @ t, 5)
    return 2 * n**3 / jax_s, 2 * n**3 / torch_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per framework (median reported)")
    parser.add_argument("--dir", default="/tmp/bench_bert_base", help="where the random checkpoint is written")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    warnings.simplefilter("ignore")

    # One random bert-base checkpoint, loaded by both frameworks.
    torch.manual_seed(0)
    hf = BertForSequenceClassification(HFBertConfig(num_labels=2, attn_implementation="sdpa"))
    hf.save_pretrained(args.dir)
    model = from_pretrained(args.dir, "sequence_classification")

    rng = np.random.default_rng(0)
    B, T = args.batch, args.length
    ids = rng.integers(1000, 30000, (B, T)).astype(np.int32)
    labels = rng.integers(0, 2, B).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32),
             "token_type_ids": np.zeros((B, T), np.int32), "labels": labels, "weights": np.ones(B, np.float32)}

    # JAX: the runner's own train step.
    mesh = make_mesh()
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))  # the step donates its state
    tx, schedule = make_optimizer(OptimConfig(lr=5e-5, warmup_steps=0, schedule="constant"), model, params, 1000)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(0))}
    state = jax.device_put(state, replicated(mesh))  # where the step keeps it: no recompilation on call 2
    step = make_train_step(graphdef, rest, cross_entropy(CrossEntropyOptions()), tx, schedule, mesh)
    device_batch = put_batch(batch, mesh)
    flops = step.lower(state, device_batch).compile().cost_analysis()["flops"]
    holder = {"state": state}

    def jax_step():
        holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics)

    jax_s = median_time(jax_step, args.steps)

    # PyTorch eager: the same computation.
    hf.train()
    decay = [p for n, p in hf.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
    no_decay = [p for n, p in hf.named_parameters() if "bias" in n or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-5)
    t_ids, t_labels = torch.tensor(ids).long(), torch.tensor(labels).long()
    t_mask = torch.ones(B, T, dtype=torch.long)

    def torch_step():
        loss = hf(input_ids=t_ids, attention_mask=t_mask, labels=t_labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch_s = median_time(torch_step, args.steps)
    jax_mm, torch_mm = matmul_flops()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}; "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"BERT-base train step, batch {B} x {T}, float32 ({flops / 1e9:.0f} GFLOP by XLA's count):")
    print(f"  JAX jit      {jax_s * 1000:8.1f} ms  {flops / jax_s / 1e9:6.1f} GFLOP/s")
    print(f"  PyTorch eager {torch_s * 1000:7.1f} ms  {flops / torch_s / 1e9:6.1f} GFLOP/s")
    print(f"  torch / jax: {torch_s / jax_s:.2f}")
    print(f"large matmul (4096^3): JAX {jax_mm / 1e9:.1f} GFLOP/s, torch {torch_mm / 1e9:.1f} GFLOP/s; "
          f"the JAX step reaches {flops / jax_s / jax_mm:.0%} of JAX's matmul rate")
    print(json.dumps({
        "jax_step_s": round(jax_s, 4), "torch_step_s": round(torch_s, 4), "ratio": round(torch_s / jax_s, 3),
        "step_gflop": round(flops / 1e9, 1), "jax_gflops": round(flops / jax_s / 1e9, 1),
        "torch_gflops": round(flops / torch_s / 1e9, 1), "matmul_gflops_jax": round(jax_mm / 1e9, 1),
        "matmul_gflops_torch": round(torch_mm / 1e9, 1), "batch": B, "length": T,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "jax": jax.__version__, "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }))


if __name__ == "__main__":
    main()
