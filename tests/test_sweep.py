"""The helpers behind the result tables in scripts/ (research/sweep.py): the final record of a run, the
mean +- std cells, and the two summary files."""

import json
import os
import shutil

import pytest

from research.sweep import last_record_with, mean_std, write_table


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


def test_grid_runs_each_cell_once_and_records_it(tmp_path, monkeypatch):
    """run_grid trains every (method, seed) with the method's overrides and the seed, seed by seed, in the run
    directories; copies the run's metrics and config beside its summary (result.json) into the record; and a
    second invocation (a resumed table, e.g. in a fresh checkout that has only the committed record, no run
    directories) trains nothing again."""
    import research.sweep as sweep

    launched = []

    def fake_train(experiment, sets, workdir, log):
        launched.append((workdir.name, sets))
        workdir.mkdir(parents=True)
        (workdir / "metrics.jsonl").write_text(json.dumps({"step": 5, "dev/accuracy": 0.5 + len(launched) / 10}))
        (workdir / "config.json").write_text(json.dumps({"seed": len(launched)}))
        (workdir / "checkpoints").mkdir()  # large: stays in the run directory

    monkeypatch.setattr(sweep, "train_run", fake_train)
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")  # conftest sets it; restored after the test
    methods = {"erm": [], "irm": ['objective.name="irm"']}

    def summarize(workdir):
        return {"acc": last_record_with(workdir, "dev/accuracy")["dev/accuracy"]}

    record, runs = tmp_path / "record", tmp_path / "runs"
    argv = ["--seeds", "0", "1", "--out", str(record), "--workdirs", str(runs)]
    out, payload = sweep.run_grid("doc", tmp_path / "exp.py", methods, "unused", summarize, argv)
    assert out == record and payload["seeds"] == [0, 1]
    # Seed by seed: a grid cut short compares every method at the same seeds.
    assert launched == [("erm_s0", ["train.seed=0"]), ("irm_s0", ['objective.name="irm"', "train.seed=0"]),
                        ("erm_s1", ["train.seed=1"]), ("irm_s1", ['objective.name="irm"', "train.seed=1"])]
    assert payload["results"]["irm"][1] == {"method": "irm", "seed": 1, "acc": 0.9}
    assert sorted(p.name for p in (record / "irm_s1").iterdir()) == ["config.json", "metrics.jsonl", "result.json"]
    assert json.loads((record / "irm_s1" / "result.json").read_text())["acc"] == 0.9
    assert (record / "irm_s1" / "metrics.jsonl").read_text() == (runs / "irm_s1" / "metrics.jsonl").read_text()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str((runs / ".xla_cache").resolve())

    shutil.rmtree(runs)  # a fresh checkout: the record alone says which runs are finished
    _, again = sweep.run_grid("doc", tmp_path / "exp.py", methods, "unused", summarize, [*argv, "--methods", "irm"])
    assert len(launched) == 4 and again["results"] == {"irm": payload["results"]["irm"]}
    with pytest.raises(SystemExit):  # an unknown method is refused by argparse, before anything runs
        sweep.run_grid("doc", tmp_path / "exp.py", methods, "unused", summarize, [*argv, "--methods", "dro"])
