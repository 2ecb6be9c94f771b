"""Environments, counterfactual pairs and the controlled spurious benchmark: how they are read (CAD from the
data root, environments from a column, from files, or generated), and the batch invariants the causal
objectives rely on, checked on 8 blocks (grad_accum x devices) as well as 1."""

import dataclasses

import numpy as np
import pytest

from research.config import ConfigError, DataConfig, SpuriousConfig, apply_overrides, load_experiment
from research.data.batches import environment_plan, epoch_batches, oversampling, pair_plan
from research.data.classification import load_split
from research.data.split import DataError
from research.models import load_tokenizer

CAD = dict(text_column="Text", label_column="Sentiment", labels=("Negative", "Positive"), max_length=64,
           buckets=(32, 64))


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


def blocks(indices: np.ndarray, groups: int) -> np.ndarray:
    return indices.reshape(groups, -1)  # (groups, B / groups): micro-batch a, shard d is block a * shards + d


@pytest.mark.parametrize("groups", [1, 8])
def test_environment_batches_hold_every_environment_in_fixed_counts_per_block(groups):
    envs = np.repeat([0, 1, 2], [500, 300, 100])  # unequal environments
    plan = environment_plan(envs, 3, 48, seed=3, epoch=0, groups=groups, proportions=(2, 2, 2))
    for indices, weights in plan:
        assert weights.min() == 1.0
        for block in blocks(indices, groups):
            assert np.bincount(envs[block], minlength=3).tolist() == [48 // groups // 3] * 3
    drawn = np.concatenate([i for i, _ in plan])
    # Every example is drawn in the epoch; environments are oversampled to keep the counts, as reported:
    # the largest only to fill its last batch (512 draws of 500), the smallest about 5x.
    draws = oversampling(envs, 3, 48, groups, (2, 2, 2))
    for e, members in enumerate((range(0, 500), range(500, 800), range(800, 900))):
        mine = drawn[envs[drawn] == e]
        assert set(mine) == set(members) and len(mine) == pytest.approx(draws[e] * len(members))
    assert len(plan) == 32 and draws[0] == pytest.approx(512 / 500) and draws[2] == pytest.approx(5.12)
    # Deterministic from (seed, epoch), different across epochs.
    again = environment_plan(envs, 3, 48, seed=3, epoch=0, groups=groups, proportions=(2, 2, 2))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(plan, again, strict=True))
    assert not np.array_equal(plan[0][0], environment_plan(envs, 3, 48, 3, 1, groups, (2, 2, 2))[0][0])


def test_environment_proportions_are_exact_or_refused():
    envs = np.repeat([0, 1], [90, 10])
    (indices, _), *_ = environment_plan(envs, 2, 10, seed=0, epoch=0, proportions=(0.8, 0.2))
    assert np.bincount(envs[indices]).tolist() == [8, 2]
    with pytest.raises(DataError, match="cannot hold all 2 environments"):
        environment_plan(envs, 2, 8, seed=0, epoch=0, groups=8)


@pytest.mark.parametrize("groups", [1, 8])
def test_pair_batches_keep_both_members_side_by_side_in_one_block(groups):
    rng = np.random.default_rng(0)
    pair_ids = rng.permutation(np.repeat(np.arange(50), 2))  # members anywhere in the file
    plan = pair_plan(pair_ids, 32, seed=1, epoch=0, groups=groups)
    seen = []
    for indices, weights in plan:
        pairs = pair_ids[indices].reshape(-1, 2)  # (B / 2, 2)
        assert (pairs[:, 0] == pairs[:, 1]).all() and (weights[0::2] == weights[1::2]).all()
        assert len(indices) % groups == 0 and (len(indices) // groups) % 2 == 0  # pairs never straddle blocks
        seen += list(pairs[weights[0::2] > 0, 0])
    assert sorted(seen) == list(range(50))  # every pair exactly once per epoch
    with pytest.raises(DataError, match="even number per block"):
        pair_plan(pair_ids, 24, seed=1, epoch=0, groups=8)


def test_cad_pairs_and_environments_from_the_data_root(data_dir, tokenizer):
    files = {"orig": "cad_imdb/orig/train.tsv", "new": "cad_imdb/new/train.tsv"}
    cfg = DataConfig(train="cad_imdb/combined/paired/train_paired.tsv", dev="cad_imdb/combined/dev.tsv",
                     pair_column="batch_id", pair_environments=("orig", "new"), **CAD)
    split = load_split(cfg, "train", tokenizer, cfg.labels, seed=0)
    assert len(split) == 3414 and split.report.pairs == 1707
    assert split.environment_names == ("orig", "new") and split.report.environment_counts == {"orig": 1707,
                                                                                              "new": 1707}
    # The combined file's examples all sit in exactly one of orig/ and new/ (text and label) ...
    combined = load_split(dataclasses.replace(cfg, train="cad_imdb/combined/train.tsv", pair_column=None,
                                              pair_environments=None, environment_files=files),
                          "train", tokenizer, cfg.labels, seed=0)
    assert combined.report.environment_counts == {"orig": 1707, "new": 1707}
    # ... and the paired file's first members are the originals: where its text matches orig/ or new/
    # (all but 3 rows, whose text differs from orig/train.tsv by an edit: row 850 "I wasn't" -> "I was"),
    # the file's environment agrees with the pair position.
    where = {(t, lab): e for t, lab, e in zip(combined.texts, combined.labels, combined.environments, strict=True)}
    found = [(where[(t, lab)], e) for t, lab, e in zip(split.texts, split.labels, split.environments, strict=True)
             if (t, lab) in where]
    assert len(found) == 3411 and all(a == b for a, b in found)
    with pytest.raises(DataError, match="train_paired.tsv row 850: its text and label are in none of"):
        load_split(dataclasses.replace(cfg, pair_environments=None, environment_files=files), "train", tokenizer,
                   cfg.labels, seed=0)
    members = np.argsort(split.pair_ids, kind="stable").reshape(-1, 2)
    # CAD's counterfactuals flip the label, and each pair is one original and one revised review.
    assert (split.labels[members[:, 0]] != split.labels[members[:, 1]]).all()
    assert (split.environments[members] == [0, 1]).all()
    # At 64 tokens some revisions' edits are cut off: the pair becomes one input with both labels, counted.
    same = sum(np.array_equal(split.input_ids[a], split.input_ids[b]) for a, b in members)
    assert same > 0 and split.report.pairs_identical_after_truncation == same
    assert f"{same:,} pairs identical after truncation" in split.report.summary()
    _, batch = next(epoch_batches(split, 16, cfg.buckets, 0, seed=0, epoch=0, micro_batches=2, shards=4))
    assert (batch.pair_ids[0::2] == batch.pair_ids[1::2]).all()
    assert (batch.labels[0::2] != batch.labels[1::2]).all()
    assert batch.environment.reshape(8, 2).tolist() == [[0, 1]] * 8  # one orig, one new per block
    # A subset keeps whole pairs; the dev split has neither pairs nor environments.
    sub = load_split(dataclasses.replace(cfg, max_train_examples=101), "train", tokenizer, cfg.labels, 0)
    assert len(sub) == 100 and np.bincount(sub.pair_ids).tolist() == [2] * 50
    dev = load_split(cfg, "dev", tokenizer, cfg.labels, seed=0)
    assert dev.pair_ids is None and dev.environments is None and len(dev) == 490


def test_broken_pairs_and_unknown_environments_are_errors(tmp_path, tokenizer):
    (tmp_path / "p.tsv").write_text("Sentiment\tText\tbatch_id\nPositive\tgood\t1\nNegative\tbad\t1\n"
                                    "Positive\tfine\t2\n")
    cfg = DataConfig(train=str(tmp_path / "p.tsv"), pair_column="batch_id", **CAD)
    with pytest.raises(DataError, match="1 pair ids do not occur exactly twice, e.g. '2' on rows \\[4\\]"):
        load_split(cfg, "train", tokenizer, cfg.labels, seed=0)
    (tmp_path / "e.tsv").write_text("Sentiment\tText\tenv\nPositive\tgood\ta\nNegative\tbad\tc\n")
    cfg = DataConfig(train=str(tmp_path / "e.tsv"), environment_column="env", environments=("a", "b"), **CAD)
    with pytest.raises(DataError, match="row 3: environment 'c' is not one of \\['a', 'b'\\]"):
        load_split(cfg, "train", tokenizer, cfg.labels, seed=0)
    (tmp_path / "a.tsv").write_text("Sentiment\tText\nPositive\tgood\n")
    cfg = DataConfig(train=str(tmp_path / "e.tsv"), environment_files={"a": str(tmp_path / "a.tsv")}, **CAD)
    with pytest.raises(DataError, match="row 3: its text and label are in none of data.environment_files"):
        load_split(cfg, "train", tokenizer, cfg.labels, seed=0)
    smoke = load_experiment("experiments/smoke.py")
    with pytest.raises(ConfigError, match="data.environment_column and data.spurious are both set"):
        apply_overrides(smoke, ['data.environment_column="env"', "data.spurious={}"])
    with pytest.raises(ConfigError, match="data.spurious.label_noise=0.6 must be in"):
        apply_overrides(smoke, ['data.spurious={"label_noise": 0.6}'])


def test_spurious_sst2_is_deterministic_and_has_the_configured_correlations(data_dir, tokenizer):
    sp = SpuriousConfig(train_agreements=(0.9, 0.8), dev_agreement=0.1, label_noise=0.25, seed=0)
    cfg = DataConfig(labels=("0", "1"), max_train_examples=8000, spurious=sp)
    clean = load_split(DataConfig(labels=("0", "1"), max_train_examples=8000), "train", tokenizer, ("0", "1"), 0)
    train = load_split(cfg, "train", tokenizer, cfg.labels, seed=0)
    again = load_split(cfg, "train", tokenizer, cfg.labels, seed=0)
    assert train.texts == again.texts and np.array_equal(train.labels, again.labels)
    assert train.environment_names == ("agree0.9", "agree0.8")
    assert abs(train.report.environment_counts["agree0.9"] - 4000) <= 1
    markers = np.array([t.split()[0] for t in train.texts])
    assert set(markers) == {"nebula", "comet"}
    assert [t.split(" ", 1)[1] for t in train.texts] == clean.texts  # the sentence itself is untouched
    noise = (train.labels != clean.labels).mean()
    assert abs(noise - 0.25) < 0.02
    for e, target in enumerate((0.9, 0.8)):
        agree = (markers == np.array(["nebula", "comet"])[train.labels])[train.environments == e].mean()
        assert abs(agree - target) < 0.02, (e, agree)
    dev = load_split(cfg, "dev", tokenizer, cfg.labels, seed=0)
    dev_markers = np.array([t.split()[0] for t in dev.texts])
    assert dev.environment_names == ("test_agree0.1",)
    assert abs((dev_markers == np.array(["nebula", "comet"])[dev.labels]).mean() - 0.1) < 0.04
    oracle = load_split(DataConfig(labels=("0", "1"), max_train_examples=8000, spurious=SpuriousConfig(oracle=True)),
                        "train", tokenizer, ("0", "1"), 0)
    assert oracle.texts == clean.texts and np.array_equal(oracle.labels, train.labels)  # same noise, no marker


def test_spurious_test_agreements_are_the_dev_split_with_other_markers(data_dir):
    from research.experiment import prepare

    cfg = apply_overrides(load_experiment("experiments/spurious_sst2.py"),
                          ["data.max_train_examples=64", "data.max_dev_examples=200",
                           "data.spurious.test_agreements=[0.0, 1.0]"])
    pieces = prepare(cfg)
    assert list(pieces.tests) == ["agree0", "agree1"]
    dev, never, always = pieces.dev, pieces.tests["agree0"], pieces.tests["agree1"]
    assert np.array_equal(never.labels, dev.labels) and np.array_equal(always.labels, dev.labels)
    # The same sentences (same noisy labels) behind the marker; the marker follows the label exactly or never.
    assert [t.split(" ", 1)[1] for t in never.texts] == [t.split(" ", 1)[1] for t in dev.texts]
    markers = np.array(["nebula", "comet"])
    assert all(t.split()[0] == markers[y] for t, y in zip(always.texts, always.labels, strict=True))
    assert all(t.split()[0] == markers[1 - y] for t, y in zip(never.texts, never.labels, strict=True))
