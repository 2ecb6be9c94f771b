"""One train step, JAX (our jit step) next to PyTorch eager and torch.compile, on the same model and inputs.

    python scripts/bench_train_step.py [--model bert] [--batch 8] [--length 128] [--steps 10]
    python scripts/bench_train_step.py --model gpt2 [--batch 16] [--length 256]

`--model bert`: BERT-base (110M) sequence classification, the default batch 8 x 128. `--model gpt2`:
experiments/tinyshakespeare_gpt2.py's GPT-2 (6 layers, 6 heads, 384 wide, 256 positions, the 50,257-token
tied output layer) as a causal LM on its batch of 16 windows of 256 tokens; the JAX step is measured with the
output layer and loss in chunks of 1,024 tokens (the default, `objective.params.lm_chunk`) and with the full
(B, T, V) logits (`lm_chunk=0`, the path before chunking), and its peak memory read from XLA's memory analysis of
the compiled step (temporaries plus arguments and outputs, less what donation aliases).

Every column: float32, the same random weights and inputs, dropout on, cross-entropy, backward, global-norm
clipping at 1.0 and an AdamW update (torch: the default `torch.optim.AdamW`, i.e. foreach). torch.compile is
what a PyTorch user picks when speed matters: the model's forward and backward compiled (inductor, default mode),
the optimizer eager; its compilation happens in the warm-up and is not timed (`--no-compile` skips it). Each
framework also times a large float32 matmul (4096^3) in the same run, so each step's achieved FLOP/s can be set
against what this machine's matmul reaches. Step FLOPs are XLA's cost analysis of the compiled JAX step (the
same count serves every column).

The last line printed is one JSON object with at least `jax_step_s`, `torch_step_s`, `ratio` (torch eager time /
JAX time: above 1 means JAX is faster) and, unless --no-compile, `torch_compile_step_s` and `ratio_compile`.
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
import transformers
from flax import nnx

from research.batch import Batch
from research.config import OptimConfig
from research.models import from_pretrained
from research.objectives.supervised import CrossEntropyOptions, cross_entropy
from research.optim import make_optimizer
from research.sharding import make_mesh, put_batch, replicated
from research.train import make_train_step


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for JAX and torch.compile)
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


def build(kind: str, directory: str, B: int, T: int):
    """(the transformers model, our task, the inputs as NumPy, torch's forward kwargs) for one random model."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    if kind == "bert":
        hf = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2,
                                                                                 attn_implementation="sdpa"))
        ids = rng.integers(1000, 30000, (B, T)).astype(np.int32)
        labels = rng.integers(0, 2, B).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32),
                 "token_type_ids": np.zeros((B, T), np.int32), "labels": labels, "weights": np.ones(B, np.float32)}
        torch_inputs = {"input_ids": torch.tensor(ids).long(), "attention_mask": torch.ones(B, T, dtype=torch.long),
                        "labels": torch.tensor(labels).long()}
        task = "sequence_classification"
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=6, n_head=6, n_embd=384, n_positions=T,
                                                                  attn_implementation="sdpa"))
        ids = rng.integers(0, 50257, (B, T)).astype(np.int32)
        # The runner's next-token targets: token t predicts t + 1; the last position has none.
        labels = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
        label_weights = np.ones((B, T), np.float32)
        label_weights[:, -1] = 0
        batch = {"input_ids": ids, "attention_mask": np.ones((B, T), np.int32), "labels": labels,
                 "weights": np.ones(B, np.float32), "label_weights": label_weights}
        torch_inputs = {"input_ids": torch.tensor(ids).long(), "labels": torch.tensor(ids).long()}  # HF shifts
        task = "causal_lm"
    hf.save_pretrained(directory)
    return hf, task, batch, torch_inputs


def jax_column(directory: str, task: str, batch: dict, steps: int, lm_chunk: int) -> dict:
    """Our train step: median seconds, XLA's FLOP count and the compiled step's peak memory."""
    model = from_pretrained(directory, task)
    mesh = make_mesh()
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))  # the step donates its state
    tx, schedule = make_optimizer(OptimConfig(lr=5e-5, warmup_steps=0, schedule="constant"), model, params, 1000)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(0))}
    state = jax.device_put(state, replicated(mesh))  # where the step keeps it: no recompilation on call 2
    objective = cross_entropy(CrossEntropyOptions(lm_chunk=lm_chunk))
    step = make_train_step(graphdef, rest, objective, tx, schedule, mesh)
    device_batch = put_batch(Batch(**batch), mesh)
    compiled = step.lower(state, device_batch).compile()
    memory = compiled.memory_analysis()
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics)

    return {"s": median_time(run, steps), "flops": compiled.cost_analysis()["flops"], "peak_bytes": int(peak),
            "temp_bytes": int(memory.temp_size_in_bytes)}


def torch_column(hf, torch_inputs: dict, steps: int, compiled: bool) -> float:
    hf.train()
    decay = [p for n, p in hf.named_parameters() if not ("bias" in n or "LayerNorm" in n or ".ln_" in n)]
    no_decay = [p for n, p in hf.named_parameters() if "bias" in n or "LayerNorm" in n or ".ln_" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-5)
    forward = torch.compile(hf) if compiled else hf

    def step():
        loss = forward(**torch_inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_time(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bert", "gpt2"], default="bert")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 (bert), 16 (gpt2)")
    parser.add_argument("--length", type=int, default=None, help="default: 128 (bert), 256 (gpt2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per column (median reported)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--dir", default=None, help="where the random checkpoint is written")
    args = parser.parse_args()
    B = args.batch or (8 if args.model == "bert" else 16)
    T = args.length or (128 if args.model == "bert" else 256)
    torch.set_num_threads(os.cpu_count())
    warnings.simplefilter("ignore")
    hf, task, batch, torch_inputs = build(args.model, args.dir or f"/tmp/bench_{args.model}", B, T)

    ours = jax_column(args.dir or f"/tmp/bench_{args.model}", task, batch, args.steps, 1024)
    full = (jax_column(args.dir or f"/tmp/bench_{args.model}", task, batch, args.steps, 0)
            if args.model == "gpt2" else None)
    eager_s = torch_column(hf, torch_inputs, args.steps, compiled=False)
    compile_s = None if args.no_compile else torch_column(hf, torch_inputs, args.steps, compiled=True)
    jax_mm, torch_mm = matmul_flops()

    flops, jax_s = ours["flops"], ours["s"]
    name = {"bert": "BERT-base sequence classification", "gpt2": "Tiny Shakespeare GPT-2 causal LM"}[args.model]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}; "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"{name} train step, batch {B} x {T}, float32 ({flops / 1e9:.0f} GFLOP by XLA's count):")
    rate = lambda s: f"{s * 1000:8.1f} ms  {flops / s / 1e9:6.1f} GFLOP/s"  # noqa: E731
    print(f"  JAX jit             {rate(jax_s)}  peak {ours['peak_bytes'] / 2**20:,.0f} MiB")
    if full is not None:
        print(f"  JAX, full logits    {rate(full['s'])}  peak {full['peak_bytes'] / 2**20:,.0f} MiB "
              f"({full['peak_bytes'] / ours['peak_bytes']:.1f}x the chunked step's)")
    print(f"  PyTorch eager       {rate(eager_s)}  torch / jax {eager_s / jax_s:.2f}")
    if compile_s is not None:
        print(f"  torch.compile       {rate(compile_s)}  torch / jax {compile_s / jax_s:.2f}")
    print(f"large matmul (4096^3): JAX {jax_mm / 1e9:.1f} GFLOP/s, torch {torch_mm / 1e9:.1f} GFLOP/s; "
          f"the JAX step reaches {flops / jax_s / jax_mm:.0%} of JAX's matmul rate")
    result = {
        "model": args.model, "jax_step_s": round(jax_s, 4), "torch_step_s": round(eager_s, 4),
        "ratio": round(eager_s / jax_s, 3), "step_gflop": round(flops / 1e9, 1),
        "jax_gflops": round(flops / jax_s / 1e9, 1), "torch_gflops": round(flops / eager_s / 1e9, 1),
        "jax_peak_mib": round(ours["peak_bytes"] / 2**20, 1), "matmul_gflops_jax": round(jax_mm / 1e9, 1),
        "matmul_gflops_torch": round(torch_mm / 1e9, 1), "batch": B, "length": T,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "jax": jax.__version__, "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if compile_s is not None:
        result.update(torch_compile_step_s=round(compile_s, 4), ratio_compile=round(compile_s / jax_s, 3))
    if full is not None:
        result.update(jax_full_logits_step_s=round(full["s"], 4), jax_full_logits_peak_mib=round(
            full["peak_bytes"] / 2**20, 1), peak_ratio=round(full["peak_bytes"] / ours["peak_bytes"], 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
