"""Multi-host data parallelism through `jax.distributed` on one machine: two processes on localhost (CPU
collectives over gloo), two simulated devices each, train experiments/smoke.py for 8 steps (in one bucket).
Process 1 is SIGKILLed after step 6, which takes the job down (the coordination service aborts process 0)
after the step-4 checkpoint; both restart with --resume from it. The result equals a single-process run of the
same 8 steps: the checkpoint was written and restored across processes, and only process 0 wrote metrics (each
step once).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from research.config import apply_overrides, load_experiment
from research.train import train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.py"

# `research train` that SIGKILLs itself after logging step `kill_at` when it is process `victim`.
KILL_PROCESS = """
import os, signal, sys
import jax
from research import metrics
from research.cli import main

victim, kill_at = int(sys.argv[1]), int(sys.argv[2])
write = metrics.MetricWriter.write

def write_then_die(self, step, values):
    write(self, step, values)
    if step == kill_at and "train/loss" in values and jax.process_index() == victim:
        os.kill(os.getpid(), signal.SIGKILL)

metrics.MetricWriter.write = write_then_die
main(sys.argv[3:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(workdir: Path, *args: str, kill_at: int = -1) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", KILL_PROCESS, "1", str(kill_at), "train", str(SMOKE), "--workdir", str(workdir),
             "--set", "train.max_steps=8", "--set", "data.buckets=[32]", *args], env=env,
            stdout=(workdir.parent / f"log{i}.txt").open("w"),
            stderr=subprocess.STDOUT))  # a file, not a pipe: nobody reads while the job runs
    # As a job scheduler does: when one task dies, the rest of the job is killed (rather than left to notice
    # through the coordination service's heartbeat timeout).
    deadline = time.monotonic() + 600
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=60), (workdir.parent / f"log{i}.txt").read_text(), "")
            for i, p in enumerate(procs)]


def records(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_killed_and_resumed_equal_one_process(tmp_path, data_dir):
    single = tmp_path / "single"
    # One bucket (here and in two_processes): each process compiles its step once.
    train(apply_overrides(load_experiment(SMOKE), ["train.max_steps=8", "data.buckets=[32]"]), single)

    run = tmp_path / "two"
    killed = two_processes(run, kill_at=6)
    assert killed[1].returncode == -9 and killed[0].returncode == -9, [k.stdout[-2000:] for k in killed]
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [4]
    done = two_processes(run, "--resume")
    assert [d.returncode for d in done] == [0, 0], [d.stdout[-3000:] for d in done]
    assert "resumed from" in done[0].stdout and "resumed from" in done[1].stdout

    mine, theirs = records(run), records(single)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]  # process 0 alone wrote, each step once
    losses = [[r["train/loss"] for r in rs if "train/loss" in r] for rs in (mine, theirs)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)  # 4 devices over 2 hosts vs 1: sum order only
    from flax import nnx

    from research.run import load_trained_model

    params = []
    for workdir in (run, single):
        model, step, _ = load_trained_model(workdir, "latest")
        assert step == 8
        params.append({"/".join(map(str, k)): np.asarray(v[...])
                       for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})
    for name in params[1]:
        np.testing.assert_allclose(params[0][name], params[1][name], rtol=1e-4, atol=1e-6, err_msg=name)
