"""Forward latency of our jit-compiled Flax BERT-base and GPT-2 (124M) next to PyTorch eager, same inputs.

    python scripts/bench_forward.py [--batch 8] [--length 128] [--iters 20]

Both models get the same random weights (a transformers model saved and loaded into ours), float32,
batch 8 x length 128 by default. JAX is timed after compilation with `block_until_ready`; PyTorch in
`torch.inference_mode()` with all cores. Reports the median of `--iters` runs and the ratio torch / jax,
and checks that the two outputs agree so the timing compares like with like.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from research.models import from_pretrained


def median_seconds(fn, iters: int) -> float:
    fn()  # warm-up (compiles on the JAX side)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, torch_model, task: str, ids: np.ndarray, iters: int) -> tuple[float, float, float]:
    torch_model.eval()
    with tempfile.TemporaryDirectory() as d:
        torch_model.save_pretrained(d)
        ours = from_pretrained(d, task)
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    ids_j, mask_j = jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)
    ids_t, mask_t = torch.tensor(ids), torch.ones(ids.shape, dtype=torch.long)

    def run_jax():
        return forward(state, ids_j, mask_j).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            out = torch_model(input_ids=ids_t, attention_mask=mask_t)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    diff = float(np.abs(np.asarray(run_jax()) - run_torch().numpy()).max())
    return median_seconds(run_jax, iters), median_seconds(run_torch, iters), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    print(f"date {datetime.date.today()}  host {platform.node()}  cpu {platform.processor() or platform.machine()}"
          f" x{os.cpu_count()}  jax {jax.__version__} on {jax.devices()[0].device_kind}  torch {torch.__version__}"
          f"  transformers {transformers.__version__}")
    print(f"float32, batch {args.batch}, length {args.length}, median of {args.iters} runs\n")
    print(f"{'model':<22}{'jax jit (ms)':>14}{'torch eager (ms)':>18}{'torch / jax':>13}{'max |diff|':>12}")
    cases = [
        ("bert-base-uncased", transformers.BertModel(transformers.BertConfig(attn_implementation="eager")),
         "base", 30522),
        ("gpt2 (124M)", transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="eager")),
         "causal_lm", 50257),
    ]
    for name, model, task, vocab in cases:
        ids = rng.integers(0, vocab, (args.batch, args.length))
        t_jax, t_torch, diff = bench(name, model, task, ids, args.iters)
        print(f"{name:<22}{t_jax * 1e3:>14.1f}{t_torch * 1e3:>18.1f}{t_torch / t_jax:>13.2f}{diff:>12.1e}")


if __name__ == "__main__":
    main()
