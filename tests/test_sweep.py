"""The helpers behind the result tables in scripts/ (research/sweep.py): the final record of a run, the
mean +- std cells, and the two summary files."""

import json

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
