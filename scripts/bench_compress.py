"""The compression study's frontier (experiments/compress_sst2.py): every model's SST-2 dev accuracy, weights
on disk and CPU inference latency at batch 1 and 32, relative to the teacher, with PyTorch beside it.

    python scripts/bench_compress.py --teacher runs/compress_teacher --runs runs/sweeps/compress_sst2 \
        --out experiments/results/compress/frontier

Models, all measured in this one run on this one machine:
- the teacher (a run of experiments/sst2_minilm.py), and its post-training quantizations (int8 weights and
  dynamic activations, int8 and int4 weights, NF4; research/compress/quantize.py through qwix) and its head
  pruning to half the heads (Michel et al.; research/compress/structured.py), made here;
- the latest checkpoint of every run directory under --runs (the study's students, pruned and QAT runs; a
  quantization-aware run is measured quantized);
- PyTorch: the teacher exported to transformers, in float32 and with `torch.ao.quantization.quantize_dynamic`
  int8 Linear layers (what a PyTorch user reaches for), on the same inputs.

Latency: the median over repeated calls of one jitted eval forward (torch: under `torch.inference_mode`), after
a warm-up that compiles every shape; batch 1 over the first 64 dev sentences, each padded to its length's
bucket, and batch 32 over the dev split's 28 batches (padded to each batch's bucket). Size: the bytes of the
weights as stored (float32; quantized codes at their width plus scales; a pruned model's nonzero weights are
counted separately, since dense storage does not shrink). Writes frontier.json and frontier.md under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from research.compress import quantize, structured
from research.data.batches import collate, eval_batches
from research.evaluate import make_eval_step, predict
from research.experiment import prepare
from research.run import load_trained_model, read_run_config
from research.sharding import make_mesh, put_batch

PTQ = ("int8", "int8_weights", "int4_weights", "nf4")


def median_ms(fn, calls: list) -> float:
    for call in calls:  # warm-up: compiles every shape
        fn(call)
    times = []
    for call in calls:
        t = time.perf_counter()
        fn(call)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def measure(model: nnx.Module, pieces, cfg, mesh) -> dict:
    """Dev accuracy and latency (ms) at batch 1 and 32 of one of our models."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_step = make_eval_step(graphdef, rest, mesh)
    logits = predict(eval_step, params, pieces.dev, 32, cfg.data.buckets, pieces.pad_id, mesh)
    accuracy = float((logits.argmax(-1) == pieces.dev.labels).mean())
    singles = [put_batch(collate(pieces.dev, np.array([i]), np.ones(1, np.float32),
                                 next(b for b in cfg.data.buckets if b >= len(pieces.dev.input_ids[i])), pieces.pad_id),
                         mesh) for i in range(64)]
    batches = [put_batch(b, mesh) for _, b in eval_batches(pieces.dev, 32, cfg.data.buckets, pieces.pad_id)]
    run = lambda b: jax.block_until_ready(eval_step(params, b))  # noqa: E731
    arrays = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    return {"accuracy": accuracy, "latency_b1_ms": median_ms(run, singles), "latency_b32_ms": median_ms(run, batches),
            "bytes": quantize.size_in_bytes(model), "parameters": int(sum(a.size for a in arrays)),
            "nonzero_parameters": int(sum(np.count_nonzero(a) for a in arrays))}


def measure_torch(directory: Path, pieces, cfg, int8: bool) -> dict:
    import torch
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(directory).eval()
    if int8:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def call(batch):
        with torch.inference_mode():
            return model(input_ids=torch.from_numpy(batch.input_ids).long(),
                         attention_mask=torch.from_numpy(batch.attention_mask).long(),
                         token_type_ids=torch.from_numpy(batch.token_type_ids).long()).logits.numpy()

    singles = [collate(pieces.dev, np.array([i]), np.ones(1, np.float32),
                       next(b for b in cfg.data.buckets if b >= len(pieces.dev.input_ids[i])), pieces.pad_id)
               for i in range(64)]
    batches = [b for _, b in eval_batches(pieces.dev, 32, cfg.data.buckets, pieces.pad_id)]
    predicted = np.concatenate([call(b)[b.weights > 0] for b in batches])
    return {"accuracy": float((predicted.argmax(-1) == pieces.dev.labels).mean()),
            "latency_b1_ms": median_ms(call, singles), "latency_b32_ms": median_ms(call, batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the teacher's run directory")
    parser.add_argument("--runs", default=None, help="a folder of run directories (the study's sweep workdirs)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--head-examples", type=int, default=2048, help="examples for the head importance")
    parser.add_argument("--ptq", nargs="*", default=list(PTQ), choices=PTQ, help="post-training quantizations")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cfg = read_run_config(Path(args.teacher))
    pieces = prepare(cfg, with_train=True, init_adapter=False)
    mesh = make_mesh()
    teacher, step, _ = load_trained_model(Path(args.teacher), "best")
    results = {"teacher": measure(teacher, pieces, cfg, mesh)}
    for method in args.ptq:
        results[f"teacher_ptq_{method}"] = measure(quantize.quantize(teacher, method), pieces, cfg, mesh)
    head_importance, _ = structured.importance(teacher, pieces.train, args.head_examples, pieces.pad_id,
                                               cfg.train.seed)
    half = structured.prune(teacher, structured.units_to_prune(head_importance, 0.5))
    results["teacher_heads_half"] = measure(half, pieces, cfg, mesh)
    for workdir in sorted(Path(args.runs).iterdir()) if args.runs else []:
        if (workdir / "checkpoints").is_dir():
            model, _, _ = load_trained_model(workdir, "latest")
            results[workdir.name] = measure(model, pieces, cfg, mesh)

    from research.models import save_pretrained

    save_pretrained(teacher, out / "teacher_hf")
    results["torch_teacher"] = measure_torch(out / "teacher_hf", pieces, cfg, int8=False)
    results["torch_teacher_dynamic_int8"] = measure_torch(out / "teacher_hf", pieces, cfg, int8=True)
    base = results["teacher"]
    for r in results.values():
        r["speedup_b1"] = base["latency_b1_ms"] / r["latency_b1_ms"]
        r["speedup_b32"] = base["latency_b32_ms"] / r["latency_b32_ms"]
    payload = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "jax": jax.__version__, "teacher": str(args.teacher), "teacher_step": step, "results": results}
    (out / "frontier.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["| model | dev accuracy | weights | nonzero | batch 1 (ms) | batch 32 (ms) | speed-up b1 / b32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        size = f"{r['bytes'] / 1e6:.1f} MB" if "bytes" in r else ""
        nonzero = f"{r['nonzero_parameters'] / r['parameters']:.0%}" if "parameters" in r else ""
        lines.append(f"| {name} | {100 * r['accuracy']:.2f} | {size} | {nonzero} | {r['latency_b1_ms']:.1f} | "
                     f"{r['latency_b32_ms']:.1f} | {r['speedup_b1']:.2f}x / {r['speedup_b32']:.2f}x |")
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
