"""Robustness evaluation (research/attacks.py): the embedding PGD attack and the character-level attack,
alone and through `research eval WORKDIR --attack pgd,char`."""

import json

import numpy as np
import pytest
from helpers import smoke

from research.attacks import char_attack, char_edits, pgd_accuracy
from research.cli import main
from research.experiment import prepare
from research.train import train


def damerau_levenshtein_is_one(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) == 1:  # one insertion or deletion
        short, long_ = sorted((a, b), key=len)
        return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                  and a[diff[1]] == b[diff[0]])
    return False


@pytest.mark.parametrize("word", ["movie", "terrible", "ok", "a"])
def test_each_character_edit_is_one_edit_away(word):
    edits = char_edits(word, np.random.default_rng(0))
    assert len(edits) == (4 if len(word) >= 2 else 1)
    for edited in edits:
        assert edited != word or len(set(word)) == 1  # a swap of equal letters is the only no-op
        assert damerau_levenshtein_is_one(word, edited) or edited == word, (word, edited)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("runs") / "smoke"
    train(smoke("train.max_steps=8", "train.eval_every=null"), workdir)
    return workdir


def test_pgd_at_zero_is_clean_accuracy_and_a_large_ball_breaks_the_model(trained):
    from research.run import read_run_config, restore_params

    cfg = read_run_config(trained)
    pieces = prepare(cfg, with_train=False)
    restore_params(trained, cfg, pieces.model, "latest")
    acc = pgd_accuracy(pieces.model, pieces.dev, (50.0, 0.0, 1.0), 32, cfg.data.buckets, pieces.pad_id, steps=5)
    clean = char_attack(pieces.model, pieces.tokenizer, pieces.dev, cfg.data.max_length, cfg.data.buckets,
                        pieces.pad_id, max_words=0)["clean_accuracy"]
    assert list(acc) == [50.0, 0.0, 1.0]  # in the order asked, though attacked smallest radius first
    assert acc[0.0] == pytest.approx(clean, abs=1e-9)
    assert acc[0.0] >= acc[1.0] >= acc[50.0] and acc[50.0] < acc[0.0]
    # Radius 50 attacked alone (on the clean survivors) breaks no more than the cascade through radius 1 does.
    alone = pgd_accuracy(pieces.model, pieces.dev, (50.0,), 32, cfg.data.buckets, pieces.pad_id, steps=5)
    assert acc[50.0] <= alone[50.0]


def test_character_attack_on_real_minilm(data_dir):
    cfg = smoke("model.init=\"pretrained\"", "model.overrides={}", "data.max_dev_examples=24")
    pieces = prepare(cfg, with_train=False)
    result = char_attack(pieces.model, pieces.tokenizer, pieces.dev, cfg.data.max_length, cfg.data.buckets,
                         pieces.pad_id, max_words=3, batch_size=32)
    assert 0 <= result["accuracy"] <= result["clean_accuracy"] <= 1
    assert result["success_rate"] > 0  # an untrained head flips easily: the attack must find some
    # 1 clean query + 1 gradient query + at most 4 edits for each of 3 words.
    assert 2 <= result["queries_per_example"] <= 2 + 4 * 3
    again = char_attack(pieces.model, pieces.tokenizer, pieces.dev, cfg.data.max_length, cfg.data.buckets,
                        pieces.pad_id, max_words=3, batch_size=32)
    assert again == result  # seeded: the same edits, the same numbers


def test_eval_attack_lands_in_metrics_jsonl(trained, capsys):
    main(["eval", str(trained), "--checkpoint", "latest", "--attack", "pgd,char", "--epsilons", "0.5", "2",
          "--max-words", "2"])
    last = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("eval_latest/accuracy", "eval_latest/pgd_eps0.5/accuracy", "eval_latest/pgd_eps2/accuracy",
                "eval_latest/char_attack/accuracy", "eval_latest/char_attack/success_rate",
                "eval_latest/char_attack/queries_per_example"):
        assert key in last, key
    assert "pgd_eps2/accuracy" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown attack"):
        main(["eval", str(trained), "--checkpoint", "latest", "--attack", "fgsm"])
