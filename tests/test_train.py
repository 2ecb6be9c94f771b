"""The runner end to end on experiments/smoke.py (a 1-layer, 32-wide BERT on 256 SST-2 sentences):

- the run directory holds what DESIGN.md promises, TensorBoard's own reader sees the metrics.jsonl values,
  and the step compiles once per length bucket;
- SIGTERM saves a checkpoint of the step it is on and exits with 143, and --resume finishes (SIGKILL at every
  point of a save, damaged checkpoints, full disks and locks: tests/test_reliability.py);
- a NaN loss stops the run naming the step, with no checkpoint after it; early stopping; refusals;
- gradient accumulation equals the big batch; 8 simulated devices equal 1 device;
- `research export` writes a directory transformers loads, predicting what `research eval` measured.
"""

import json

import jax
import numpy as np
import pytest
from helpers import params_of, records, run_and_signal, run_on_one_and_eight_devices, smoke, step_dirs

from research.cli import main
from research.run import RunError
from research.train import NonFiniteLossError, train


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("runs") / "smoke"
    metrics = train(smoke(), workdir)
    return workdir, metrics


def test_run_directory_and_metrics(smoke_run):
    workdir, final = smoke_run
    config = json.loads((workdir / "config.json").read_text())
    assert config["name"] == "smoke" and config["data"]["labels"] == ["0", "1"]
    assert config["provenance"]["versions"]["jax"] == jax.__version__ and "git" in config["provenance"]
    assert config["objective"]["params"] == {"label_smoothing": 0.0, "lm_chunk": 1024}  # defaults recorded
    report = json.loads((workdir / "data_report.json").read_text())
    assert report["train"]["used"] == 256 and report["dev"]["used"] == 64
    rs = records(workdir)
    train_rs = [r for r in rs if "train/loss" in r]
    dev_rs = [r for r in rs if "dev/accuracy" in r]
    assert [r["step"] for r in train_rs] == list(range(2, 17, 2))  # log_every=2 over 16 steps
    assert [r["step"] for r in dev_rs] == [4, 8, 12, 16]  # eval_every=4
    assert dev_rs[-1]["dev/accuracy"] == final["dev/accuracy"]
    assert train_rs[0]["train/lr"] < train_rs[1]["train/lr"] > train_rs[-1]["train/lr"]  # warmup then decay
    assert all(np.isfinite(r["train/grad_norm"]) and r["train/update_norm"] > 0 for r in train_rs)
    # Compiled once per length bucket (16 and 32), however many steps run.
    assert train_rs[-1]["train/compilations"] <= 2
    assert step_dirs(workdir) == [12, 16]  # keep=2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    expected = {"train/loss", "train/lr", "train/grad_norm", "dev/accuracy", "dev/f1_macro"}
    assert expected <= set(events.Tags()["scalars"])
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert tb_loss == [(r["step"], pytest.approx(r["train/loss"], rel=1e-6)) for r in train_rs]


# A process that never imported torch writes its metrics without importing it (tensorboardX would, for seconds),
# and can import it afterwards.
METRICS_WITHOUT_TORCH = """
import sys
from pathlib import Path
from research.metrics import MetricWriter
writer = MetricWriter(Path(sys.argv[1]))
writer.write(1, {"train/loss": 0.25})
writer.close()
assert "torch" not in sys.modules, "tensorboardX imported torch"
import torch
print("torch", torch.__version__)
"""


def test_metrics_are_written_without_importing_torch(tmp_path):
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = subprocess.run([sys.executable, "-c", METRICS_WITHOUT_TORCH, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "torch 2." in done.stdout, done.stdout + done.stderr
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.25)]


def test_eval_and_export_agree_with_transformers(smoke_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    from research.data.batches import eval_batches
    from research.data.classification import load_split
    from research.models import load_tokenizer

    workdir, _ = smoke_run
    main(["eval", str(workdir), "--checkpoint", "latest"])
    out = capsys.readouterr().out
    accuracy = records(workdir)[-1]["eval_latest/accuracy"]
    assert "macro avg" in out and f"eval_latest/accuracy {accuracy:.4f}" in out
    assert accuracy == [r for r in records(workdir) if "dev/accuracy" in r][-1]["dev/accuracy"]

    main(["export", str(workdir), str(tmp_path / "hf"), "--checkpoint", "latest"])
    torch_model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch_model.config.id2label == {0: "0", 1: "1"}
    cfg = smoke()
    dev = load_split(cfg.data, "dev", load_tokenizer(tmp_path / "hf"), cfg.data.labels, 0)
    correct = 0
    with torch.no_grad():
        for _, b in eval_batches(dev, 32, cfg.data.buckets, 0):
            logits = torch_model.eval()(input_ids=torch.tensor(b.input_ids).long(),
                                        attention_mask=torch.tensor(b.attention_mask).long()).logits.numpy()
            correct += ((logits.argmax(-1) == b.labels) * b.weights).sum()
    assert correct / len(dev) == pytest.approx(accuracy, abs=1e-9)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    workdir = tmp_path / "terminated"
    done = run_and_signal(workdir, 2, "SIGTERM")
    assert done.returncode == 143, done.stdout + done.stderr  # 128 + SIGTERM, documented (research.train)
    assert "SIGTERM: saved a checkpoint at step 2 of 16; resume with --resume" in done.stdout + done.stderr
    assert step_dirs(workdir) == [2]
    train(smoke(), workdir, resume=True)
    assert records(workdir)[-1]["step"] == 16


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, data_dir):
    # lr 1e30 from the first step: the first update wrecks the weights and a later loss is NaN.
    cfg = smoke("optim.lr=1e30", "optim.warmup_ratio=0", "optim.clip_norm=null", "train.log_every=1",
                "checkpoint.every_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan .* at step \d+ .*nothing was saved for it") as e:
        train(cfg, tmp_path / "nan")
    bad = int(str(e.value).split(" at step ")[1].split()[0])
    saved = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(range(1, bad))  # every step before it, none from it on
    assert f"the last checkpoint is step {bad - 1}" in str(e.value)
    logged = [r["step"] for r in records(tmp_path / "nan") if "train/loss" in r]
    assert logged == list(range(1, bad))  # the NaN step is never logged as a number


def test_early_stopping_and_refusals(tmp_path, data_dir):
    workdir = tmp_path / "early"
    # The smoke model sits at chance: dev accuracy never improves after the first evaluation (step 4).
    train(smoke("checkpoint.patience=1"), workdir)
    dev = [r["step"] for r in records(workdir) if "dev/accuracy" in r]
    assert dev == [4, 8] and step_dirs(workdir) == [4, 8]
    before = records(workdir)
    train(smoke("checkpoint.patience=1"), workdir, resume=True)  # stopped early: nothing left to do
    assert records(workdir) == before
    with pytest.raises(RunError, match="already holds checkpoints .* pass --resume"):
        train(smoke(), workdir)
    with pytest.raises(RunError, match=r"differs from .*config.json \(optim.lr: 0.001 -> 0.002\)"):
        train(smoke("optim.lr=2e-3", "checkpoint.patience=1"), workdir, resume=True)


def test_gradient_accumulation_equals_the_full_batch(tmp_path, data_dir):
    # Without dropout the two are the same computation, up to float summation order.
    no_dropout = ["model.overrides.hidden_dropout_prob=0", "model.overrides.attention_probs_dropout_prob=0",
                  "train.max_steps=3", "train.eval_every=null"]
    train(smoke(*no_dropout), tmp_path / "full")
    train(smoke(*no_dropout, "train.grad_accum=4"), tmp_path / "accum")
    full = [r["train/loss"] for r in records(tmp_path / "full") if "train/loss" in r]
    accum = [r["train/loss"] for r in records(tmp_path / "accum") if "train/loss" in r]
    np.testing.assert_allclose(accum, full, rtol=1e-5)
    _, a = params_of(tmp_path / "full")
    _, b = params_of(tmp_path / "accum")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_eight_simulated_devices_match_one(tmp_path, data_dir):
    one, eight, fsdp = run_on_one_and_eight_devices(tmp_path, fsdp=True)
    # Same math, with the batch split 8 ways (and with FSDP the parameters and Adam's moments too): only the
    # order of float sums differs (dropout included: the random bits do not depend on the sharding).
    assert one["embedding"] == eight["embedding"] == "P()"
    assert fsdp["embedding"] == "P(None, 'data')"  # (30522, 32): 8 does not divide 30522, so the width is split
    for run in (eight, fsdp):
        np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-5)
        for name in one["params"]:
            np.testing.assert_allclose(run["params"][name], one["params"][name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_bfloat16_compute_keeps_float32_master_weights(tmp_path, data_dir):
    base = ["train.max_steps=2", "train.eval_every=null", "train.log_every=1"]
    train(smoke(*base), tmp_path / "f32")
    train(smoke(*base, "train.compute_dtype=bfloat16"), tmp_path / "bf16")
    f32 = [r["train/loss"] for r in records(tmp_path / "f32") if "train/loss" in r]
    bf16 = [r["train/loss"] for r in records(tmp_path / "bf16") if "train/loss" in r]
    np.testing.assert_allclose(bf16, f32, atol=2e-2)  # bfloat16 keeps ~3 significant digits
    assert bf16 != f32  # it did compute in bfloat16
    _, params = params_of(tmp_path / "bf16")
    assert {p.dtype for p in params.values()} == {np.dtype("float32")}
