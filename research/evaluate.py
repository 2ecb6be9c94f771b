"""Evaluation: a jit-compiled forward over a split, then metrics on the host.

Sequence classification: accuracy, per-class and macro precision/recall/F1, Matthews' correlation and the loss,
from the confusion matrix; the tests check them against scikit-learn's `classification_report`, `f1_score` and
`matthews_corrcoef`, which we do not depend on at run time for a few lines of arithmetic. Regression: scipy's
Pearson and Spearman correlation, and the mean-squared error. Token classification: entity-level precision/recall/F1
(micro, and F1 per entity type) by conlleval's rules (below, checked against seqeval),
plus the loss and accuracy over the tokens that carry a label (each word's first piece).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from research.batch import Batch
from research.data.batches import eval_batches
from research.data.split import Split
from research.objectives.supervised import chunked_token_sums
from research.sharding import place_rest, put_batch, replicated

EVAL_LM_CHUNK = 1024  # tokens per chunk of a causal LM's output layer at evaluation


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, mesh: Mesh, token_sums: bool = False) -> Callable:
    """(params, batch) -> logits (B, C) or (B, T, C) float32, with the model in eval mode (no dropout).

    `token_sums`: instead of logits, the batch's sums over its weighted token targets, {"nll", "targets",
    "correct"}; a causal LM's logits, (B, T, 50257), are too large to bring to the host, or even to hold at
    once: a model with an `output_embedding` (GPT-2's LM head) computes them `EVAL_LM_CHUNK` tokens at a time."""

    def step(params, rest, batch: Batch):
        model = nnx.merge(graphdef, params, rest)
        mb = jax.tree.map(lambda x: x[0], batch)  # (1, B, ...) -> (B, ...): eval batches are never split
        w = mb.label_weights  # (B, T)
        if token_sums and hasattr(model, "output_embedding"):
            nll, correct = chunked_token_sums(model.features(**mb.model_inputs()), model.output_embedding(),
                                              mb.labels, w, EVAL_LM_CHUNK)
            return {"nll": nll, "targets": w.sum(), "correct": correct}
        logits = model(**mb.model_inputs())
        if not token_sums:
            return logits
        log_probs = jax.nn.log_softmax(logits, axis=-1)  # (B, T, V)
        nll = -jnp.take_along_axis(log_probs, mb.labels[..., None], axis=-1)[..., 0]  # (B, T)
        correct = (logits.argmax(-1) == mb.labels).astype(jnp.float32)
        return {"nll": (nll * w).sum(), "targets": w.sum(), "correct": (correct * w).sum()}

    jitted = jax.jit(step, out_shardings=replicated(mesh))
    rest = place_rest(rest, mesh)
    return lambda params, batch: jitted(params, rest, batch)


def predict(eval_step: Callable, params: dict, split: Split, batch_size: int, buckets: tuple[int, ...],
            pad_id: int, mesh: Mesh) -> np.ndarray:
    """Logits (N, C) for every example of `split`, in order."""
    out = []
    for _, batch in eval_batches(split, batch_size, buckets, pad_id):
        logits = np.asarray(eval_step(params, put_batch(batch, mesh)))
        out.append(logits[batch.weights > 0])  # filler rows of the last batch dropped here
    return np.concatenate(out)


def predict_tokens(eval_step: Callable, params: dict, split: Split, batch_size: int, buckets: tuple[int, ...],
                   pad_id: int, mesh: Mesh) -> list[np.ndarray]:
    """Logits (T_i, C) for every example (window) of a token-classification split, in order."""
    out = []
    for b, batch in eval_batches(split, batch_size, buckets, pad_id):
        logits = np.asarray(eval_step(params, put_batch(batch, mesh)))  # (B, T, C)
        for row in range(int((batch.weights > 0).sum())):  # filler rows sit at the end of the last batch
            out.append(logits[row, : len(split.input_ids[b * batch_size + row])])
    return out


def tagging_metrics(logits: list[np.ndarray], split: Split, names: tuple[str, ...]) -> tuple[dict, str]:
    """Scalars {entity_precision, entity_recall, entity_f1, <type>/f1, accuracy, loss} and a per-type report;
    `accuracy` and `loss` are over the labelled tokens (first pieces), the entity scores over the gold sentences
    of the split (a `research.data.tagging.TaggedSplit`, which maps window predictions back to them)."""
    windows, sentences = split.windows, split.sentences
    labels = np.concatenate(windows.token_labels)  # (all tokens,)
    flat = np.concatenate(logits)  # (all tokens, C)
    kept = labels >= 0
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(flat[kept], jnp.float32), axis=-1))
    predicted = split.predicted_tags([x.argmax(-1) for x in logits], names)
    scores = entity_scores(sentences.tags, predicted)
    scalars = {**{k: v for k, v in scores.items() if not k.endswith("/support")},
               "accuracy": float((flat[kept].argmax(-1) == labels[kept]).mean()),
               "loss": float(-log_probs[np.arange(len(log_probs)), labels[kept]].mean())}
    kinds = sorted(k.removesuffix("/f1") for k in scores if k.endswith("/f1") and k != "entity_f1")
    width = max(len(x) for x in ("entities", *kinds))
    lines = [f"{'':>{width}}  f1-score  support"]
    lines += [f"{k:>{width}}  {scores[k + '/f1']:8.4f}  {int(scores[k + '/support']):7d}" for k in kinds]
    support = int(sum(scores[k + "/support"] for k in kinds))
    lines.append(f"{'entities':>{width}}  {scores['entity_f1']:8.4f}  {support:7d}  (precision "
                 f"{scores['entity_precision']:.4f}, recall {scores['entity_recall']:.4f})")
    return scalars, "\n".join(lines)


def lm_metrics(eval_step: Callable, params: dict, split: Split, batch_size: int, buckets: tuple[int, ...],
               pad_id: int, mesh: Mesh) -> tuple[dict, str]:
    """{loss, perplexity, accuracy} over every token target of a causal-LM split (`eval_step` made with
    `token_sums=True`): loss is the mean negative log-likelihood per token, perplexity its exponential."""
    total = {"nll": 0.0, "targets": 0.0, "correct": 0.0}
    for _, batch in eval_batches(split, batch_size, buckets, pad_id):
        for k, v in jax.device_get(eval_step(params, put_batch(batch, mesh))).items():
            total[k] += float(v)
    loss = total["nll"] / total["targets"]
    counts = split.report.label_counts
    scalars = {"loss": loss, "perplexity": float(np.exp(loss)), "accuracy": total["correct"] / total["targets"],
               # The same total log-likelihood per whitespace word and per byte of the text (every token but
               # the first is predicted): comparable across tokenizers, as lm-evaluation-harness reports them.
               "word_perplexity": float(np.exp(total["nll"] / max(counts["words"], 1))),
               "bits_per_byte": total["nll"] / max(counts["bytes"], 1) / float(np.log(2))}
    report = (f"{int(total['targets']):,} tokens predicted in {len(split):,} windows: loss {loss:.4f} nats/token, "
              f"perplexity {scalars['perplexity']:.3f} (per word {scalars['word_perplexity']:.3f}, "
              f"{scalars['bits_per_byte']:.4f} bits/byte), next-token accuracy {scalars['accuracy']:.4f}")
    return scalars, report


def evaluate_split(task: str, eval_step: Callable, params: dict, split: Split, names: tuple[str, ...],
                   batch_size: int, buckets: tuple[int, ...], pad_id: int, mesh: Mesh) -> tuple[dict, str]:
    """The metrics of one split of `task` (the model's, `model.task`) and a text report."""
    if task == "token_classification":
        return tagging_metrics(predict_tokens(eval_step, params, split, batch_size, buckets, pad_id, mesh), split,
                               names)
    if task == "causal_lm":
        return lm_metrics(eval_step, params, split, batch_size, buckets, pad_id, mesh)
    if task == "sequence_classification" and np.issubdtype(split.labels.dtype, np.floating):  # regression
        return regression_metrics(predict(eval_step, params, split, batch_size, buckets, pad_id, mesh), split.labels)
    if task == "sequence_classification":
        return classification_metrics(predict(eval_step, params, split, batch_size, buckets, pad_id, mesh),
                                      split.labels, names)
    raise ValueError(f"model.task={task!r} has no evaluation; the trainable tasks are sequence_classification, "
                     "token_classification and causal_lm")


def evaluate_splits(task: str, eval_step: Callable, params: dict, pieces, batch_size: int,
                    buckets: tuple[int, ...], mesh: Mesh) -> tuple[dict[str, float], dict[str, str]]:
    """Dev and every test set of `pieces` (research.experiment.Pieces), each under its own name: the scalars as
    `dev/<metric>` and `<set>/<metric>` (research/metrics.py), and the text report of each."""
    scalars, reports = {}, {}
    for prefix, split in {"dev": pieces.dev, **pieces.tests}.items():
        found, reports[prefix] = evaluate_split(task, eval_step, params, split, pieces.labels, batch_size, buckets,
                                                pieces.pad_id, mesh)
        scalars.update({f"{prefix}/{k}": v for k, v in found.items()})
    return scalars, reports


def classification_metrics(logits: np.ndarray, labels: np.ndarray, names: tuple[str, ...]) -> tuple[dict, str]:
    """Scalars {accuracy, loss, precision_macro, recall_macro, f1_macro, mcc} and a per-class report; a binary
    task also gets `f1`, the F1 of label id 1 (scikit-learn's `f1_score` default, and GLUE's MRPC F1: MRPC's
    labels sort as "0", "1", paraphrase last). `mcc` is Matthews' correlation (GLUE's CoLA metric), in its
    multi-class form (Gorodkin 2004, as scikit-learn's `matthews_corrcoef`)."""
    n = len(names)
    pred = logits.argmax(-1)
    confusion = np.zeros((n, n), np.int64)  # rows: true label, columns: predicted
    np.add.at(confusion, (labels, pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A class never predicted (or absent) has precision (recall) 0, as scikit-learn's zero_division=0.
        precision = np.nan_to_num(tp / confusion.sum(0))
        recall = np.nan_to_num(tp / support)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    loss = float(-np.asarray(log_probs)[np.arange(len(labels)), labels].mean())
    scalars = {"accuracy": float(tp.sum() / len(labels)), "loss": loss, "precision_macro": float(precision.mean()),
               "recall_macro": float(recall.mean()), "f1_macro": float(f1.mean()), "mcc": matthews(confusion)}
    if n == 2:
        scalars["f1"] = float(f1[1])
    width = max(len(x) for x in (*names, "macro avg"))
    lines = [f"{'':>{width}}  precision  recall  f1-score  support"]
    for i, name in enumerate(names):
        lines.append(f"{name:>{width}}  {precision[i]:9.4f}  {recall[i]:6.4f}  {f1[i]:8.4f}  {support[i]:7d}")
    lines.append(f"{'macro avg':>{width}}  {precision.mean():9.4f}  {recall.mean():6.4f}  {f1.mean():8.4f}  "
                 f"{support.sum():7d}")
    lines.append(f"{'accuracy':>{width}}  {scalars['accuracy']:.4f} of {len(labels)}")
    lines.append(f"{'mcc':>{width}}  {scalars['mcc']:.4f}")
    return scalars, "\n".join(lines)


def matthews(confusion: np.ndarray) -> float:
    """Matthews' correlation from a confusion matrix (rows true, columns predicted), in the multi-class form
    cov(true, pred) / sqrt(cov(true, true) cov(pred, pred)) over one-hot vectors; 0 when either side is
    constant (scikit-learn's convention)."""
    c = confusion.astype(np.float64)
    s, correct = c.sum(), np.trace(c)
    t, p = c.sum(1), c.sum(0)  # true and predicted counts per class
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((correct * s - t @ p) / denominator) if denominator else 0.0


def regression_metrics(logits: np.ndarray, scores: np.ndarray) -> tuple[dict, str]:
    """Scalars {pearson, spearman, mse, loss} of the one output (E, 1) against the gold scores (E,), and a
    report. The correlations are scipy's (GLUE's STS-B metrics); loss is the mean-squared error, the training
    loss. A constant prediction has no correlation: NaN, as scipy gives, and the report says so."""
    from scipy import stats  # a dependency of jax; imported here, where it is used

    predicted = logits[:, 0].astype(np.float64)
    gold = scores.astype(np.float64)
    mse = float(((predicted - gold) ** 2).mean())
    constant = bool(np.ptp(predicted) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = float("nan") if constant else float(stats.pearsonr(predicted, gold).statistic)
        spearman = float("nan") if constant else float(stats.spearmanr(predicted, gold).statistic)
    scalars = {"pearson": pearson, "spearman": spearman, "mse": mse, "loss": mse}
    report = (f"{len(gold):,} scores: Pearson {pearson:.4f}, Spearman {spearman:.4f}, mean-squared error {mse:.4f}; "
              f"predicted mean {predicted.mean():.3f} (gold {gold.mean():.3f})"
              + (" -- every prediction is the same value, so there is no correlation" if constant else ""))
    return scalars, report


# --------------------------------------------------------------------------------------------- scoring


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of every entity in one tag sequence, by conlleval's chunk rules (IOB1 or IOB2)."""
    found, start, kind = [], None, None
    for i, tag in enumerate([*tags, "O"]):  # the sentinel closes an entity at the end
        prefix, typ = (tag[0], tag[2:]) if tag != "O" else ("O", "")
        # conlleval's endOfChunk: an entity ends before O, before B, or where the type changes.
        if start is not None and (prefix in ("O", "B") or typ != kind):
            found.append((kind, start, i - 1))
            start = None
        # startOfChunk: B starts one; so does an I that follows O or another type.
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return found


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro precision/recall/F1 over entities, and `<type>/f1` (with `<type>/support`) per entity type."""
    true = {(s, *e) for s, tags in enumerate(gold) for e in entities(tags)}
    pred = {(s, *e) for s, tags in enumerate(predicted) for e in entities(tags)}

    def prf(t: set, p: set) -> tuple[float, float, float]:
        hit = len(t & p)
        precision = hit / len(p) if p else 0.0
        recall = hit / len(t) if t else 0.0
        return precision, recall, 2 * precision * recall / (precision + recall) if hit else 0.0

    precision, recall, f1 = prf(true, pred)
    out = {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}
    for kind in sorted({e[1] for e in true | pred}):
        t = {e for e in true if e[1] == kind}
        p = {e for e in pred if e[1] == kind}
        out[f"{kind}/f1"] = prf(t, p)[2]
        out[f"{kind}/support"] = float(len(t))
    return out
