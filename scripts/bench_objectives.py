"""Train-step time of every objective relative to supervised cross-entropy, on real SST-2 batches.

    RESEARCH_DATA_DIR=../shared/data python scripts/bench_objectives.py [--steps 10] [--objectives fgm pgd ...]

The model and data are experiments/sst2_minilm.py's (all-MiniLM-L6-v2, batch 32, packed rows of 64 tokens);
each objective runs with its default options (the papers') through the same jit-compiled train step. The
same 10 batches are replayed for every objective after a warm-up pass that compiles each of their shapes,
so the median step times are comparable. Prints a table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.config import ObjectiveConfig, apply_overrides, load_experiment
from research.data.batches import epoch_batches
from research.experiment import prepare
from research.objectives import ENVIRONMENT_OBJECTIVES, OBJECTIVES, PAIR_OBJECTIVES, make_objective
from research.objectives.state import StatefulObjective
from research.optim import make_optimizer
from research.sharding import make_mesh, put_batch, replicated
from research.train import make_train_step

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    # The objectives that train on plain SST-2 batches (environment and pair objectives need other data).
    plain = [o for o in OBJECTIVES if o not in ENVIRONMENT_OBJECTIVES | PAIR_OBJECTIVES]
    parser.add_argument("--objectives", nargs="+", default=plain, choices=plain)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    cfg = apply_overrides(load_experiment(ROOT / "experiments" / "sst2_minilm.py"),
                          ["data.max_train_examples=2048"])
    pieces = prepare(cfg)
    mesh = make_mesh()
    batches = [put_batch(b, mesh) for _, b in epoch_batches(pieces.train, 32, cfg.data.buckets, pieces.pad_id, 0, 0,
                                                             pack_length=cfg.data.pack_length)]
    batches = batches[: args.steps]
    model = pieces.model
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    results = {}
    for name in ["cross_entropy", *[o for o in args.objectives if o != "cross_entropy"]]:
        objective = make_objective(ObjectiveConfig(name=name))
        tx, schedule = make_optimizer(cfg.optim, model, params, 1000)
        state = {"params": jax.tree.map(jnp.copy, params), "step": jnp.int32(0),
                 "rng": jax.random.key_data(jax.random.key(0))}
        state["opt_state"] = tx.init(state["params"])
        if isinstance(objective, StatefulObjective):
            state["objective"] = objective.init_state(params)
        state = jax.device_put(state, replicated(mesh))
        step = make_train_step(graphdef, rest, objective, tx, schedule, mesh)
        for b in batches:  # warm-up: compiles every row count of these batches
            state, metrics = step(state, b)
        jax.block_until_ready(metrics)
        times = []
        for b in batches:
            t = time.perf_counter()
            state, metrics = step(state, b)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        results[name] = float(np.median(times))
        print(f"{name:14s} {1000 * results[name]:8.0f} ms/step  x{results[name] / results['cross_entropy']:.2f}",
              flush=True)
    print(json.dumps({"step_s": results, "relative": {k: v / results["cross_entropy"] for k, v in results.items()},
                      "batches": len(batches), "machine": f"{platform.machine()} {os.cpu_count()} cores",
                      "jax": jax.__version__, "date": datetime.date.today().isoformat()}))


if __name__ == "__main__":
    main()
