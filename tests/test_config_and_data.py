"""Experiment configs (every file in experiments/ loads; bad keys and types fail with the promised
messages), the classification data pipeline (labels checked, rows accounted for, batches deterministic and
bucketed), evaluation metrics against scikit-learn, and the optimizer against transformers' schedule."""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    OptimConfig,
    apply_overrides,
    load_experiment,
    load_experiment_module,
    variant_overrides,
)
from research.data.batches import epoch_batches
from research.data.classification import load_split
from research.data.split import DataError
from research.evaluate import classification_metrics
from research.models import from_config, load_tokenizer
from research.models.bert import BertConfig
from research.optim import make_optimizer, make_schedule

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.py"))
SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.py"  # batch 32: the messages below name it


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_loads_and_says_how_to_run_it(path):
    cfg = load_experiment(path)
    assert isinstance(cfg, ExperimentConfig)
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and ("research train experiments/" in doc or "research eval experiments/" in doc), \
        f"{path.name}'s docstring must give its command"
    assert "xpect" in doc, f"{path.name}'s docstring must say what it should reach"
    # A study's variants (research sweep) are checked here too, each applied to get_config() in this process.
    module = load_experiment_module(path)
    for name, changes in getattr(module, "VARIANTS", {}).items():
        varied = apply_overrides(cfg, variant_overrides(changes))
        for key, value in changes.items():  # each change landed where it says, with its type
            node = varied.to_dict()
            for part in key.split("."):
                node = node[part]
            # Sequences compare as lists: a variant may write [0, 2, 4] for a field the config holds as a tuple.
            as_list = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
            assert as_list(node) == as_list(value), f"{path.name}: {name}: {key}"


def test_overrides_parse_json_and_check_types():
    cfg = load_experiment(SMOKE)
    cfg = apply_overrides(cfg, ["optim.lr=3e-5", "train.batch_size=16", "data.buckets=[8, 16, 64]",
                                "data.max_length=64", "optim.clip_norm=null", "model.overrides.hidden_dropout_prob=0"])
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.data.buckets, cfg.optim.clip_norm) == (3e-5, 16, (8, 16, 64), None)
    assert cfg.model.overrides["hidden_dropout_prob"] == 0


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"),
    ("optimizer.lr=1e-3", r"unknown config key 'optimizer'; did you mean 'optim'\?"),
    ("train.batch_size=abc", r"train.batch_size must be int, got str 'abc'"),
    ("train.batch_size=3.5", r"train.batch_size must be int, got float 3.5"),
    ("optim.schedule=exponential", r"optim.schedule='exponential' is not allowed; choose one of"),
    ("data.buckets=[16, 8]", r"data.buckets=\(16, 8\) must be strictly increasing and end at data.max_length"),
    ("train.grad_accum=3", r"train.batch_size=32 is not divisible by train.grad_accum=3"),
    ("optim.lr", r"not of the form key=value"),
    ('data.test={"dev": "sst2/dev.tsv"}', r"data.test name 'dev' would mix its metrics with another group's"),
])
def test_bad_overrides_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_experiment(SMOKE), [override])


def test_unknown_key_in_an_experiment_file_fails_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from research.config import ExperimentConfig\n"
                   "from research.config import from_dict\n"
                   "def get_config():\n"
                   "    return from_dict(ExperimentConfig, {'name': 'x', 'train': {'epochz': 2}})\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epochz'; did you mean 'train.epochs'\?"):
        load_experiment(bad)


# ----------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


def _tsv(tmp_path, rows, name="train.tsv"):
    path = tmp_path / name
    path.write_text("sentence\tlabel\n" + "".join(r + "\n" for r in rows))
    return str(path)


def test_a_label_outside_the_label_set_is_an_error_naming_the_row(tmp_path, tokenizer):
    path = _tsv(tmp_path, ["good film\t1", "bad film\t0", "odd film\t2"])
    cfg = DataConfig(train=path, dev=path, labels=("0", "1"))
    with pytest.raises(DataError, match=r"row 4: label '2' is not in the label set \['0', '1'\]"):
        load_split(cfg, "train", tokenizer, cfg.labels, seed=0)


def test_every_row_is_accounted_for(tmp_path, tokenizer):
    long = " ".join(["wonderful"] * 40)
    path = _tsv(tmp_path, ["good film\t1", "\t0", "too\tmany\tfields", f"{long}\t1", 'a "quoted" one\t0'])
    cfg = DataConfig(train=path, dev=path, labels=("0", "1"), max_length=16, buckets=(16,))
    # A malformed row is an error naming its line, unless data.skip_malformed asks to skip (and count) it.
    with pytest.raises(DataError, match=r"train.tsv line 4: 3 fields where the header has 2 .*data.skip_malformed"):
        load_split(cfg, "train", tokenizer, cfg.labels, seed=0)
    split = load_split(dataclasses.replace(cfg, skip_malformed=True), "train", tokenizer, cfg.labels, seed=0)
    r = split.report
    assert (r.rows, r.used) == (5, 3)
    assert r.skipped == {"empty text": 1, "malformed row (3 fields, the header has 2)": 1}
    assert r.skipped_rows == {"empty text": [3], "malformed row (3 fields, the header has 2)": [4]}
    assert (r.truncated_examples, r.truncated_tokens) == (1, 42 - 16)  # [CLS] + 40 + [SEP] = 42 tokens
    assert split.texts[2] == 'a "quoted" one'  # TSV quotes are text, not CSV quoting
    assert max(len(x) for x in split.input_ids) == 16 and split.input_ids[1][-1] == tokenizer.token_to_id("[SEP]")


def test_sst2_batches_are_deterministic_complete_and_bucketed(data_dir, tokenizer):
    cfg = DataConfig(labels=("0", "1"), max_train_examples=1000, buckets=(16, 32, 48, 64))
    split = load_split(cfg, "train", tokenizer, cfg.labels, seed=0)
    assert len(split) == 1000 and split.report.subset_of == 67349

    def epoch(e, start=0):
        return list(epoch_batches(split, 96, cfg.buckets, 0, seed=0, epoch=e, start=start))

    a, b, other = epoch(0), epoch(0), epoch(1)
    assert all(np.array_equal(x.input_ids, y.input_ids) for (_, x), (_, y) in zip(a, b, strict=True))
    assert not np.array_equal(a[0][1].input_ids, other[0][1].input_ids)
    assert [i for i, _ in epoch(0, start=4)] == list(range(4, 11))  # resuming mid-epoch
    assert np.array_equal(epoch(0, start=4)[0][1].labels, a[4][1].labels)
    # Every example exactly once per epoch (the last batch is topped up with weight-0 rows).
    assert len(a) == math.ceil(1000 / 96) and all(x.input_ids.shape[0] == 96 for _, x in a)
    assert sum(x.weights.sum() for _, x in a) == 1000
    assert {x.input_ids.shape[1] for _, x in a} <= set(cfg.buckets)
    for _, x in a:  # the bucket is the smallest that holds the longest row
        longest = x.attention_mask.sum(1).max()
        assert x.input_ids.shape[1] == min(bk for bk in cfg.buckets if bk >= longest)


def test_missing_data_root_names_the_setting(monkeypatch, tokenizer):
    monkeypatch.delenv("RESEARCH_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="RESEARCH_DATA_DIR is not set"):
        load_split(DataConfig(labels=("0", "1")), "train", tokenizer, ("0", "1"), seed=0)


# -------------------------------------------------------------------------------------------- metrics


def test_classification_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[labels]
    logits[:, 2] -= 10  # class 2 never predicted: precision 0 by convention, as zero_division=0
    scalars, report = classification_metrics(logits, labels, ("neg", "neu", "pos"))
    pred = logits.argmax(-1)
    p, r, f, _ = precision_recall_fscore_support(labels, pred, average="macro", zero_division=0)
    assert scalars["accuracy"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
    macro = (scalars["precision_macro"], scalars["recall_macro"], scalars["f1_macro"])
    assert macro == pytest.approx((p, r, f), abs=1e-12)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert scalars["loss"] == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2]), abs=1e-5)
    assert "neu" in report and "macro avg" in report


# ------------------------------------------------------------------------------------------- optimizer


def test_schedule_matches_transformers_linear_warmup():
    import torch
    from transformers import get_linear_schedule_with_warmup

    total, cfg = 100, OptimConfig(lr=5e-5, warmup_ratio=0.06)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(0.06 * total), total)
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])  # the lr the update at this step uses
        opt.step()
        sched.step()
    ours = [float(make_schedule(cfg, total)(i)) for i in range(total)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12)


def _tiny_bert():
    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=16)
    model = from_config(cfg, "sequence_classification")
    return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _one_update(cfg: OptimConfig):
    model, params = _tiny_bert()
    tx, _ = make_optimizer(cfg, model, params, total_steps=10)
    grads = jax.tree.map(jnp.zeros_like, params)  # zero gradients: AdamW's step is then pure weight decay
    updates, _ = tx.update(grads, tx.init(params), params)
    return params, updates


def test_weight_decay_skips_biases_and_layer_norms():
    params, updates = _one_update(OptimConfig(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.1))
    flat = {"/".join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(updates).items()}
    values = {"/".join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(params).items()}
    for name, u in flat.items():
        no_decay = name.endswith("bias") or "layer_norm" in name
        expected = np.zeros_like(u) if no_decay else -0.1 * np.asarray(values[name])
        np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=name)


def test_layerwise_lr_decay_and_freezing():
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.1, layerwise_lr_decay=0.5,
                      freeze=("bert/embeddings/.*",))
    params, updates = _one_update(cfg)
    u, p = updates["bert"], params["bert"]
    ratio = lambda a, b: float(np.asarray(a).ravel()[0] / (-0.1 * np.asarray(b).ravel()[0]))  # noqa: E731
    # 3 layers: layer i gets 0.5 ** (3 - i); the classifier and pooler the full rate; embeddings frozen.
    for i in range(3):
        k = u["layers"][i]["attention"]["query"]["kernel"]
        assert ratio(k, p["layers"][i]["attention"]["query"]["kernel"]) == pytest.approx(0.5 ** (3 - i))
    assert ratio(u["pooler"]["kernel"], p["pooler"]["kernel"]) == pytest.approx(1.0)
    assert ratio(updates["classifier"]["kernel"], params["classifier"]["kernel"]) == pytest.approx(1.0)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u["embeddings"]))
    with pytest.raises(ConfigError, match="optim.freeze pattern 'encoder/.*' matches no parameter"):
        _one_update(OptimConfig(freeze=("encoder/.*",)))


def test_hub_datasets_without_the_package_say_how_to_get_it(monkeypatch, tokenizer):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    cfg = DataConfig(source="hf:glue/sst2", train="train", dev="validation", labels=("0", "1"))
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install datasets"):
        load_split(cfg, "train", tokenizer, cfg.labels, seed=0)
