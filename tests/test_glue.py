"""GLUE beyond SST-2 (research/data/glue.py): the files as GLUE ships them, sentence pairs, regression, and the
GLUE metrics.

- the readers, each on the real file of its quirk: CoLA without a header row and without a final newline (and
  a backspace kept), MRPC's byte-order mark and untokenized text, RTE's unquoted leading `"`, STS-B's float
  scores; a malformed row or a score that is not a number is an error naming file and line;
- sentence pairs carry token types 0 and 1 and pack like single sentences (the same logits on real MRPC pairs
  with the real all-MiniLM-L6-v2);
- regression: the loss and gradients equal transformers' `problem_type="regression"` (mean-squared error), a
  run trains and is scored by Pearson and Spearman, and its export loads in transformers as a regressor that
  predicts the same;
- the metrics equal scikit-learn's (Matthews correlation, F1) and independent computations of Pearson and
  Spearman; configurations that make no sense for a regression are refused.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import ROOT, check_objective, randomize_, tiny_batch

from research.config import ConfigError, ExperimentConfig, TrainConfig, apply_overrides, load_experiment
from research.data.batches import collate, pack
from research.data.classification import load_split
from research.data.glue import glue_data
from research.data.split import DataError
from research.evaluate import classification_metrics, regression_metrics
from research.models import from_pretrained, load_tokenizer
from research.objectives import adversarial, supervised
from research.run import evaluate_run, export_run
from research.train import train


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(str(minilm_dir))


def read(task, split, tokenizer, **changes):
    cfg = glue_data(task, max_length=changes.pop("max_length", 128), buckets=(128,) if "buckets" not in changes else
                    changes.pop("buckets"), **changes)
    regression = cfg.labels is None
    return load_split(cfg, split, tokenizer, cfg.labels, 0, regression=regression)


# ------------------------------------------------------------------------------------------- the readers


def test_cola_has_no_header_row_and_its_dev_file_no_final_newline(tokenizer, data_dir):
    train, dev = read("cola", "train", tokenizer), read("cola", "dev", tokenizer)
    assert (len(train), len(dev)) == (8551, 1043)  # every line a row: none taken for a header
    assert train.report.label_counts == {"0": 2528, "1": 6023} and dev.report.label_counts == {"0": 322, "1": 721}
    last = (data_dir / "glue/CoLA/dev.tsv").read_bytes()
    assert not last.endswith(b"\n")  # the quirk is there, and the last row is still read whole
    assert dev.texts[-1] == last.decode().rsplit("\n", 1)[-1].split("\t")[3].strip()
    assert sum("\x08" in t for t in train.texts) == 3  # train lines 7130-7132, kept as they are
    # Read with its first row as a header instead, the file has no "sentence" column: the error says what to set.
    with pytest.raises(DataError, match=r"row 2 has no column 'sentence'.*data.columns if the file has no header"):
        load_split(dataclasses.replace(glue_data("cola"), columns=None), "train", tokenizer, ("0", "1"), 0)


def test_mrpc_header_byte_order_mark_and_untokenized_pairs(tokenizer, data_dir):
    assert (data_dir / "glue/MRPC/train.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    train, dev = read("mrpc", "train", tokenizer), read("mrpc", "dev", tokenizer)
    assert (len(train), len(dev)) == (3668, 408)
    assert train.report.label_counts == {"0": 1194, "1": 2474} and dev.report.label_counts == {"0": 129, "1": 279}
    assert train.texts[0].startswith('Amrozi accused his brother, whom he called "the witness", of')
    # Each pair is one input, [CLS] a [SEP] b [SEP], the second sentence with token type 1.
    ids, types = train.input_ids[0], train.token_type_ids[0]
    sep = np.flatnonzero(ids == tokenizer.token_to_id("[SEP]"))
    assert len(sep) == 2 and types[: sep[0] + 1].max() == 0 and types[sep[0] + 1 :].min() == 1


def test_rte_fields_beginning_with_a_quote_are_text(tokenizer, data_dir):
    train = read("rte", "train", tokenizer, max_length=256, buckets=(256,))
    assert (len(train), len(read("rte", "dev", tokenizer))) == (2490, 277)
    assert train.report.label_counts == {"entailment": 1249, "not_entailment": 1241}
    line = (data_dir / "glue/RTE/train.tsv").read_text().splitlines()[2165]  # row index 2164 (after the header)
    assert line.split("\t")[1].startswith('"') and line.split("\t")[0] == "2164"
    assert train.texts[2164] == line.split("\t")[1].strip()  # the quote kept, and the row not merged with others
    assert train.report.truncated_examples == 2  # 289- and 257-token pairs: cut, and reported


def test_stsb_scores_are_floats(tokenizer):
    train, dev = read("stsb", "train", tokenizer), read("stsb", "dev", tokenizer)
    assert (len(train), len(dev)) == (5749, 1500)
    assert train.labels.dtype == np.float32 and dev.labels.dtype == np.float32
    assert train.labels.min() == 0 and train.labels.max() == 5
    assert round(float(train.labels.mean()), 3) == 2.701 and round(float(dev.labels.mean()), 3) == 2.364
    assert train.report.score_stats["max"] == 5 and "scores min/mean/max 0/2.7/5" in train.report.summary()
    assert any("\x12" in t for t in train.texts)  # line 2920's control character, from MSRpar


def test_malformed_rows_and_bad_scores_are_errors_naming_the_line(tmp_path, tokenizer):
    path = tmp_path / "bad.tsv"
    path.write_text("sentence1\tsentence2\tscore\na\tb\t1.5\nc\td\n")
    cfg = dataclasses.replace(glue_data("stsb"), train=str(path))
    with pytest.raises(DataError, match=r"bad.tsv line 3: 2 fields where the header has 3 .*data.skip_malformed"):
        load_split(cfg, "train", tokenizer, None, 0, regression=True)
    split = load_split(dataclasses.replace(cfg, skip_malformed=True), "train", tokenizer, None, 0, regression=True)
    assert len(split) == 1 and split.report.skipped_rows == {"malformed row (2 fields, the header has 3)": [3]}
    path.write_text("sentence1\tsentence2\tscore\na\tb\t1.5\nc\td\thigh\n")
    with pytest.raises(DataError, match=r"bad.tsv row 3: score 'high' is not a finite number"):
        load_split(cfg, "train", tokenizer, None, 0, regression=True)


# -------------------------------------------------------------------------------------- pairs, packed


def test_real_mrpc_pairs_pack_like_single_sentences(minilm_dir, tokenizer):
    model = from_pretrained(minilm_dir, "sequence_classification", num_labels=2)
    model.eval()
    dev = read("mrpc", "dev", tokenizer)
    indices, weights = np.arange(32), np.ones(32, np.float32)
    padded, packed = collate(dev, indices, weights, 128, 0), pack(dev, indices, weights, 128, 0)
    assert packed.input_ids.shape[0] < 20 and packed.token_type_ids.max() == 1  # several pairs a row
    logits_padded = model(**{k: jnp.asarray(v) for k, v in padded.model_inputs().items()})
    logits_packed = model(**{k: jnp.asarray(v) for k, v in packed.model_inputs().items()})
    np.testing.assert_allclose(logits_packed, logits_padded, atol=1e-5)


# ------------------------------------------------------------------------------------------ regression


def regression_pair(tmp_path):
    """A tiny random transformers BERT regressor, and ours loaded from it."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=83, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, num_labels=1, problem_type="regression",
                                  attn_implementation="eager")
    theirs = randomize_(transformers.BertForSequenceClassification(cfg), seed=5)
    theirs.save_pretrained(tmp_path)
    return theirs, from_pretrained(tmp_path, "sequence_classification")


def test_regression_loss_and_gradients_equal_transformers(tmp_path):
    theirs, ours = regression_pair(tmp_path)
    assert ours.config.problem_type == "regression" and ours.config.num_labels == 1
    batch = tiny_batch().replace(labels=np.array([0.5, 4.2, 2.0, 3.3], np.float32))
    out = theirs(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
                 attention_mask=torch.tensor(batch.attention_mask), token_type_ids=torch.tensor(batch.token_type_ids),
                 labels=torch.tensor(batch.labels))  # transformers: MSELoss(logits.squeeze(), labels)
    out.loss.backward()
    check_objective((theirs, ours), supervised.cross_entropy(supervised.CrossEntropyOptions()), out.loss, batch)
    # Filler rows (weight 0) count in neither the loss nor its weight total.
    b = jax.tree.map(jnp.asarray, batch.replace(weights=np.array([1, 1, 0, 1], np.float32)))
    logits = ours(**b.model_inputs())
    loss, aux = supervised.task_loss(logits, b)
    expected = np.mean([(float(logits[i, 0]) - float(b.labels[i])) ** 2 for i in (0, 1, 3)])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert set(aux) == {"mse", "weight"} and float(aux["weight"]) == 3


def test_regression_divergences_are_squared_differences(tmp_path):
    """SMART and VAT compare a regression's predictions by their squared difference (Jiang et al. 2020)."""
    batch = jax.tree.map(jnp.asarray, tiny_batch(weights=(1, 0, 1, 1)))
    p, q = jnp.array([[0.5], [1.0], [2.0], [-1.0]]), jnp.array([[1.5], [7.0], [2.5], [-1.0]])
    expected = (1.0 + 0.25 + 0.0) / 3  # the weight-0 row left out
    np.testing.assert_allclose(float(adversarial.symmetric_kl(p, q, batch)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(adversarial.kl_divergence(p, q, batch)), expected, rtol=1e-6)


def stsb_tiny(*overrides) -> ExperimentConfig:
    """experiments/glue_stsb.py shrunk: a 1-layer 32-wide BERT from scratch (MiniLM's vocabulary), 64 training
    pairs, 64 dev pairs, 4 steps."""
    cfg = load_experiment(ROOT / "experiments" / "glue_stsb.py")
    cfg = dataclasses.replace(cfg, train=TrainConfig(batch_size=16, max_steps=4, log_every=1, eval_batch_size=32))
    return apply_overrides(cfg, ['model.init="scratch"', 'model.overrides={"hidden_size": 32, "num_hidden_layers": 1, '
                                 '"num_attention_heads": 2, "intermediate_size": 64}',
                                 "data.max_train_examples=64", "data.max_dev_examples=64", "optim.lr=1e-3",
                                 *overrides])


def test_a_regression_run_trains_scores_and_exports_for_transformers(tmp_path, data_dir):
    import transformers

    from research.data.batches import eval_batches
    from research.experiment import prepare
    from research.run import load_trained_model

    workdir = tmp_path / "run"
    train(stsb_tiny(), workdir)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "dev/pearson" in r][-1]
    assert {"dev/pearson", "dev/spearman", "dev/mse", "dev/loss"} <= set(final) and final["step"] == 4
    assert all("train/mse" in r for r in records if "train/loss" in r)  # the regression's train metric
    assert json.loads((workdir / "config.json").read_text())["model"]["problem_type"] == "regression"

    metrics, report = evaluate_run(workdir, "latest")  # `research eval` of the run: the same scores again
    assert metrics["eval_latest/pearson"] == pytest.approx(final["dev/pearson"], abs=1e-6) and "Pearson" in report
    with pytest.raises(ValueError, match="is a regression: the attacks count examples whose predicted class"):
        evaluate_run(workdir, "latest", attacks=("pgd",))

    export_run(workdir, tmp_path / "hf", "latest")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert theirs.config.problem_type == "regression" and theirs.config.num_labels == 1
    theirs.eval()
    pieces = prepare(stsb_tiny(), with_train=False)
    batch = next(eval_batches(pieces.dev, 16, (32, 64, 96, 128), pieces.pad_id))[1]
    ours, _, _ = load_trained_model(workdir, "latest")
    mine = np.asarray(ours(**{k: jnp.asarray(v) for k, v in batch.model_inputs().items()}))
    with torch.no_grad():
        out = theirs(**{k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in batch.model_inputs().items()},
                     labels=torch.tensor(batch.labels))
    assert mine.shape == (16, 1)
    np.testing.assert_allclose(out.logits.numpy(), mine, atol=1e-5)
    np.testing.assert_allclose(float(out.loss), float(np.mean((mine[:, 0] - batch.labels) ** 2)), rtol=1e-5)


@pytest.mark.parametrize("override, message", [
    ('objective.name="kd"', r"objective.name='kd' compares class distributions"),
    ('data.labels=["0", "1"]', r"reads float scores, not classes: unset data.labels"),
    ('checkpoint.best_metric="dev/accuracy"', r"is a classification metric.*dev/pearson"),
])
def test_what_a_regression_cannot_do_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        stsb_tiny(override)


# ------------------------------------------------------------------------------------------- metrics


def test_glue_metrics_equal_scikit_learn_and_independent_correlations():
    from scipy.stats import rankdata
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    for n_classes in (2, 3):
        labels = rng.integers(0, n_classes, 200)
        logits = rng.normal(size=(200, n_classes)) + 1.5 * np.eye(n_classes)[labels]  # better than chance
        found, report = classification_metrics(logits, labels, tuple(str(i) for i in range(n_classes)))
        pred = logits.argmax(-1)
        np.testing.assert_allclose(found["mcc"], matthews_corrcoef(labels, pred), rtol=1e-12)
        np.testing.assert_allclose(found["accuracy"], accuracy_score(labels, pred), rtol=1e-12)
        assert "mcc" in report
        if n_classes == 2:  # GLUE's MRPC F1: the positive class's (label id 1), scikit-learn's default
            np.testing.assert_allclose(found["f1"], f1_score(labels, pred), rtol=1e-12)
        else:
            assert "f1" not in found
    constant = np.tile([0.0, 1.0], (50, 1))  # one class predicted throughout: scikit-learn's MCC is 0
    assert classification_metrics(constant, rng.integers(0, 2, 50), ("0", "1"))[0]["mcc"] == 0.0 == \
        matthews_corrcoef(rng.integers(0, 2, 50), np.ones(50))

    gold = np.round(rng.uniform(0, 5, 300) * 5) / 5  # STS-B-like scores, with ties
    predicted = gold + rng.normal(0, 1.0, 300)
    found, report = regression_metrics(predicted[:, None].astype(np.float32), gold.astype(np.float32))
    np.testing.assert_allclose(found["pearson"], np.corrcoef(predicted.astype(np.float32), gold)[0, 1], rtol=1e-6)
    # Spearman: Pearson of the ranks, ties given their average rank.
    ranks = np.corrcoef(rankdata(predicted.astype(np.float32)), rankdata(gold))[0, 1]
    np.testing.assert_allclose(found["spearman"], ranks, rtol=1e-6)
    np.testing.assert_allclose(found["mse"], np.mean((predicted.astype(np.float32) - gold) ** 2), rtol=1e-5)
    flat, flat_report = regression_metrics(np.ones((10, 1), np.float32), gold[:10].astype(np.float32))
    assert np.isnan(flat["pearson"]) and "no correlation" in flat_report


def test_a_glue_record_keeps_the_tasks_metrics_last_and_best(tmp_path):
    from research.data.glue import run_summary

    lines = [{"step": 10, "train/loss": 0.6, "train/examples_per_s": 5.0},  # the first window: compiling
             {"step": 20, "train/loss": 0.5, "train/examples_per_s": 40.0},
             {"step": 20, "dev/f1": 0.80, "dev/accuracy": 0.70, "dev/mcc": 0.3},
             {"step": 30, "train/loss": 0.4, "train/examples_per_s": 50.0},
             {"step": 40, "train/loss": 0.3, "train/examples_per_s": 60.0},
             {"step": 40, "dev/f1": 0.78, "dev/accuracy": 0.74, "dev/mcc": 0.35}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert run_summary(tmp_path, "mrpc") == {"f1": 0.78, "accuracy": 0.74, "best_f1": 0.80, "best_accuracy": 0.74,
                                             "examples_per_s": 50.0, "steps": 40}
    assert run_summary(tmp_path, "cola")["mcc"] == 0.35 and run_summary(tmp_path, "cola")["accuracy"] == 0.74
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(RuntimeError, match="no dev evaluation: did the run finish"):
        run_summary(tmp_path, "rte")


def test_adversarial_objectives_train_a_regression(tmp_path):
    """FGM, PGD (with a clean term) and VAT on a regression head: finite losses, and the regression's metric
    (mse) where a classifier logs accuracy, under the same names."""
    _, ours = regression_pair(tmp_path)
    batch = jax.tree.map(jnp.asarray, tiny_batch().replace(labels=np.array([0.5, 4.2, 2.0, 3.3], np.float32)))
    for objective, expected in [
            (adversarial.fgm(adversarial.FGMOptions()), {"mse", "adversarial_mse", "clean_loss", "adversarial_loss"}),
            (adversarial.pgd(adversarial.PGDOptions(clean_weight=0.5)),
             {"mse", "adversarial_mse", "clean_loss", "adversarial_loss", "first_step_loss"}),
            (adversarial.vat(adversarial.VATOptions()), {"mse", "task_loss", "vat_loss"})]:
        loss, aux = objective(ours, batch, jax.random.key(0))
        assert np.isfinite(float(loss)) and expected <= set(aux) and "accuracy" not in aux
        assert not any(k.startswith("adversarial_adversarial") or k.startswith("adversarial_first") for k in aux)
