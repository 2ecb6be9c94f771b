"""`research sweep` (research/sweep.py): variants checked before anything trains, every (variant, seed) run
once and recorded, the summary, a fresh checkout that trains nothing again, and a sweep killed with SIGKILL that
resumes and finishes; the helpers behind the tables (the final record of a run, mean +- std, the two files)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SMOKE, deterministic, records, smoke

from research.checkpoint import MANIFEST
from research.config import ConfigError
from research.sweep import last_record_with, load_study, mean_std, run_study, write_table
from research.train import train


def test_last_record_and_table(tmp_path):
    run = tmp_path / "erm_s0"
    run.mkdir()
    lines = [{"step": 10, "train/loss": 0.7}, {"step": 20, "dev/accuracy": 0.5}, {"step": 40, "dev/accuracy": 0.75},
             {"step": 40, "train/loss": 0.3}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert last_record_with(run, "dev/accuracy") == {"step": 40, "dev/accuracy": 0.75}
    with pytest.raises(RuntimeError, match="no record with 'test/orig/accuracy': did the run finish"):
        last_record_with(run, "test/orig/accuracy")
    assert mean_std([0.8, 0.9, 1.0]) == "90.0 +- 10.0" and mean_std([0.5]) == "50.0 +- 0.0" and mean_std([]) == "-"
    text = write_table(tmp_path, ["method", "acc"], [["erm", "90.0 +- 10.0"]], {"seeds": [0, 1, 2]})
    assert text == "| method | acc |\n|---|---:|\n| erm | 90.0 +- 10.0 |"
    assert (tmp_path / "summary.md").read_text() == text + "\n"
    assert json.loads((tmp_path / "summary.json").read_text()) == {"seeds": [0, 1, 2]}


def test_metric_names_of_earlier_runs_are_renamed_on_read():
    """Each split logs under its own name (research/metrics.py); a committed record from before says
    test/<set>/..., and reads as today's names, from its config.json's test-set names."""
    from research.metrics import read_records, renamed

    cad = read_records(Path(__file__).resolve().parents[1] / "experiments" / "results" / "cad" / "erm_orig_s0")
    final = [r for r in cad if "dev/accuracy" in r][-1]
    assert {"orig/accuracy", "new/accuracy", "dev/accuracy"} <= set(final)
    assert not any(k.startswith("test/") for r in cad for k in r)
    old = {"test/test/entity_f1": 0.8, "test/test/PER/f1": 0.9, "eval_best/test/orig/accuracy": 0.7, "dev/loss": 1.0}
    assert renamed(old, {"test", "orig"}) == {"test/entity_f1": 0.8, "test/PER/f1": 0.9,
                                              "eval_best/orig/accuracy": 0.7, "dev/loss": 1.0}
    today = {"test/entity_f1": 0.8, "test/PER/f1": 0.9, "orig/accuracy": 0.7}  # unchanged: already today's
    assert renamed(today, {"test", "orig"}) == today


STUDY = '''
from research.config import load_experiment

def get_config():
    return load_experiment("{smoke}")

VARIANTS = {{"erm": {{}}, "irm": {{"objective.name": "irm", "optim.reset_at_step": 3}}}}
'''


def test_a_sweep_runs_each_cell_once_and_records_it(tmp_path, monkeypatch):
    """Every (variant, seed), seed by seed, with the variant's changes as --set JSON and the seed; the run's
    metrics and config copied beside its summary (result.json) into the record; the default summary (the last
    evaluation, mean +- std); and a second sweep (e.g. a fresh checkout holding only the committed record)
    trains nothing again."""
    import research.sweep as sweep

    launched = []

    def fake_train(experiment, sets, workdir, log):
        launched.append((workdir.name, sets))
        workdir.mkdir(parents=True)
        (workdir / "metrics.jsonl").write_text(json.dumps({"step": 5, "dev/accuracy": 0.5 + len(launched) / 10}))
        (workdir / "config.json").write_text(json.dumps({"seed": len(launched)}))
        (workdir / "checkpoints").mkdir()  # large: stays in the run directory
        return {"wall_s": 1.5, "resumed": False}

    monkeypatch.setattr(sweep, "train_run", fake_train)
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")  # conftest sets it; restored after the test
    experiment = tmp_path / "study.py"
    experiment.write_text(STUDY.format(smoke=SMOKE))
    study = load_study(experiment)
    assert study.results == "study" and list(study.variants) == ["erm", "irm"]
    record, runs = tmp_path / "record", tmp_path / "runs"
    payload, table = run_study(study, ["erm", "irm"], [0, 1], record, runs)
    assert launched == [("erm_s0", ["train.seed=0"]),
                        ("irm_s0", ['objective.name="irm"', "optim.reset_at_step=3", "train.seed=0"]),
                        ("erm_s1", ["train.seed=1"]),
                        ("irm_s1", ['objective.name="irm"', "optim.reset_at_step=3", "train.seed=1"])]
    assert payload["results"]["irm"][1] == {"method": "irm", "seed": 1, "step": 5, "dev/accuracy": 0.9, "wall_s": 1.5,
                                            "resumed": False}  # the run's time: not a column of the table
    assert table == "| variant | dev/accuracy |\n|---|---:|\n| erm | 70.0 +- 14.1 |\n| irm | 80.0 +- 14.1 |"
    assert sorted(p.name for p in (record / "irm_s1").iterdir()) == ["config.json", "metrics.jsonl", "result.json"]
    assert (record / "irm_s1" / "metrics.jsonl").read_text() == (runs / "irm_s1" / "metrics.jsonl").read_text()

    shutil.rmtree(runs)  # a fresh checkout: the record alone says which runs are finished
    again, _ = run_study(study, ["irm"], [0, 1], record, runs)
    assert len(launched) == 4 and again["results"] == {"irm": payload["results"]["irm"]}
    with pytest.raises(ConfigError, match="has no variant 'dro'; choose from \\['erm', 'irm'\\]"):
        run_study(study, ["dro"], [0], record, runs)


def test_a_variant_with_a_bad_key_or_type_fails_before_anything_trains(tmp_path):
    experiment = tmp_path / "study.py"
    experiment.write_text(STUDY.format(smoke=SMOKE).replace('"optim.reset_at_step": 3', '"optim.reset_at_stepp": 3'))
    with pytest.raises(ConfigError, match="variant 'irm': unknown config key 'optim.reset_at_stepp'"):
        load_study(experiment)
    experiment.write_text(STUDY.format(smoke=SMOKE).replace('"optim.reset_at_step": 3', '"optim.lr": "fast"'))
    with pytest.raises(ConfigError, match="variant 'irm': .*optim.lr"):
        load_study(experiment)


def test_a_sweep_killed_with_sigkill_resumes_and_finishes(tmp_path, data_dir):
    out, runs = tmp_path / "record", tmp_path / "runs"
    command = [sys.executable, "-m", "research.cli", "sweep", str(SMOKE), "--variants", "base", "--seeds", "0",
               "--out", str(out), "--workdirs", str(runs)]
    # The sweep and its `research train` child in one process group, killed together once step 8 is committed.
    log = tmp_path / "sweep.log"
    with log.open("w") as sink:
        sweep = subprocess.Popen(command, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (runs / "base_s0" / "checkpoints" / "8" / MANIFEST).is_file():
        assert sweep.poll() is None and time.monotonic() < deadline, \
            "the sweep ended before its step-8 checkpoint:\n" + log.read_text()[-2000:] + _tail(runs / "base_s0.log")
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    assert not (out / "base_s0" / "result.json").exists()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = train(smoke(), tmp_path / "reference")
    result = json.loads((out / "base_s0" / "result.json").read_text())
    assert result["step"] == 16 and result["dev/accuracy"] == reference["dev/accuracy"]
    assert result["resumed"] is True and result["wall_s"] > 0  # the finishing invocation's time, said to be so
    assert deterministic(records(runs / "base_s0")) == deterministic(records(tmp_path / "reference"))
    assert "| base |" in (out / "summary.md").read_text() and "| base |" in done.stdout


def _tail(path) -> str:
    return "\n" + path.read_text()[-3000:] if path.is_file() else ""
