"""Robustness evaluation of a sequence classifier: an embedding-space PGD attack and a discrete
character-level attack guided by gradient saliency.

- `pgd_accuracy`: accuracy when every dev example's word embeddings are perturbed by PGD (L2 ball of radius
  epsilon per example, `steps` ascent steps of size 2.5 * epsilon / steps, Madry et al.'s rule, no random
  start, so the number is deterministic), for each epsilon of a grid. The white-box worst case the
  adversarial objectives train against; epsilon 0 is the clean accuracy. The radii are attacked in
  increasing order, each only on the examples still classified correctly at the previous one: a perturbation
  that breaks an example at a smaller radius lies inside every larger ball, so the example counts as broken
  there too (robust accuracy is the fraction that withstands every radius up to epsilon; never more than
  PGD at epsilon alone would give). This, and batches of similar lengths, make the attack several times
  cheaper than attacking all of dev at every radius (10 PGD steps x 4 radii cost ~10x a 250-step training
  run of MiniLM on SST-2 otherwise).
- `char_attack`: a black-box-style attack in the manner of DeepWordBug (Gao et al. 2018) that needs no
  external resources. Words (whitespace-separated) are ranked by gradient saliency (the L2 norm of the loss
  gradient at the word's token embeddings, summed over its word pieces: one gradient query); then, word by
  word in that order, each of four character edits (swap two adjacent letters, substitute, delete, insert,
  at a position drawn from the seed) is tried (one query each), and the edit that lowers the true label's
  probability most is kept, until the prediction flips or `max_words` words are edited. Reported: accuracy
  under attack, attack success rate (flipped among the examples first classified correctly) and queries per
  attacked example.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.data.batches import collate, eval_batches
from research.data.split import Split, SplitReport
from research.models.families import family_of
from research.objectives import adversarial

# --------------------------------------------------------------------------------------- embedding PGD


def make_pgd_step(graphdef: nnx.GraphDef, rest: nnx.State, steps: int) -> Callable:
    """(params, batch, epsilon) -> correct (B,) float: the prediction after the attack equals the label."""

    def attacked(params, batch, epsilon):
        # A copy of `rest`: NNX refuses to touch variables created under another trace level.
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
        embeds, inputs = adversarial.embedded(model, batch)
        attack = adversarial.attack_loss(model, inputs, batch, 0.0)
        delta = jnp.zeros_like(embeds)
        for _ in range(steps):  # steps = 0: the clean prediction
            alpha = 2.5 * epsilon / steps
            _, g = adversarial.delta_grad(model, attack, embeds, delta)
            delta = adversarial.project(delta + alpha * adversarial.normalize(g, batch, "l2"), batch, epsilon, "l2")
        logits = adversarial.logits_at(model, embeds + delta, inputs)
        return (logits.argmax(-1) == batch.labels).astype(jnp.float32)

    return jax.jit(attacked)


def pgd_accuracy(model: nnx.Module, split: Split, epsilons: tuple[float, ...], batch_size: int,
                 buckets: tuple[int, ...], pad_id: int, steps: int = 10) -> dict[float, float]:
    """{epsilon: accuracy under the attack} over every example of `split` (model in eval mode), the radii
    attacked in increasing order on the survivors of the previous one (module docstring)."""
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lengths = np.array([len(x) for x in split.input_ids])

    def still_correct(step: Callable, indices: np.ndarray, eps: float) -> np.ndarray:
        """The subset of `indices` the model still classifies correctly under `step` at radius `eps`."""
        order = indices[np.argsort(lengths[indices], kind="stable")]  # similar lengths share a batch: less padding
        kept = []
        for b, batch in eval_batches(split, batch_size, buckets, pad_id, order):
            c = np.asarray(step(params, jax.tree.map(jnp.asarray, batch), jnp.float32(eps)))
            rows = order[b * batch_size : (b + 1) * batch_size]
            kept.append(rows[c[: len(rows)] > 0])
        return np.sort(np.concatenate(kept)) if kept else indices

    survivors = still_correct(make_pgd_step(graphdef, rest, 0), np.arange(len(split)), 0.0)  # clean
    attack = make_pgd_step(graphdef, rest, steps)
    out = {}
    for eps in sorted(epsilons):
        if eps > 0 and len(survivors):
            survivors = still_correct(attack, survivors, eps)
        out[eps] = len(survivors) / len(split)
    return {eps: out[eps] for eps in epsilons}


# ------------------------------------------------------------------------------------ character attack


def char_edits(word: str, rng: np.random.Generator) -> list[str]:
    """The four DeepWordBug edits of `word` at a random position: swap, substitute, delete, insert."""
    letters = string.ascii_lowercase
    if len(word) < 2:
        return [word + rng.choice(list(letters))]  # too short to swap or delete: only an insertion
    i = int(rng.integers(0, len(word) - 1))
    swapped = word[:i] + word[i + 1] + word[i] + word[i + 2:]
    substituted = word[:i] + rng.choice([c for c in letters if c != word[i].lower()]) + word[i + 1:]
    deleted = word[:i] + word[i + 1:]
    inserted = word[:i] + rng.choice(list(letters)) + word[i:]
    return [swapped, substituted, deleted, inserted]


class _Classifier:
    """Texts -> probabilities and word saliencies, through the tokenizer and two jit-compiled functions."""

    def __init__(self, model: nnx.Module, tokenizer, max_length: int, buckets: tuple[int, ...], pad_id: int,
                 batch_size: int):
        model.eval()
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.tokenizer, self.max_length, self.buckets, self.pad_id = tokenizer, max_length, buckets, pad_id
        self.batch_size = batch_size
        self._probs = jax.jit(lambda p, b: jax.nn.softmax(self._model(p)(**b.model_inputs()), -1))
        self.token_types = family_of(model).has_token_types  # see Batch.token_type_ids
        self._saliency = jax.jit(self._token_saliency)

    def _model(self, params):
        return nnx.merge(self.graphdef, params, jax.tree.map(lambda x: x, self.rest))  # a copy: see make_pgd_step

    def _token_saliency(self, params, batch):
        model = self._model(params)
        embeds, inputs = adversarial.embedded(model, batch)
        _, g = adversarial.delta_grad(model, adversarial.attack_loss(model, inputs, batch, 0.0), embeds,
                                       jnp.zeros_like(embeds))
        return jnp.linalg.norm(g, axis=-1)  # (B, T)

    def _encode(self, words_list: list[list[str]]):
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        encodings = self.tokenizer.encode_batch(words_list, is_pretokenized=True)
        self.tokenizer.no_truncation()
        return encodings

    def _batches(self, encodings, labels: np.ndarray):
        ids = [np.array(e.ids, np.int32) for e in encodings]
        types = [np.array(e.type_ids, np.int32) for e in encodings] if self.token_types else None
        split = Split("attack", ids, types, labels.astype(np.int32),
                      [""] * len(ids), SplitReport("attack", ""))
        lengths = np.array([len(x) for x in ids])
        for start in range(0, len(ids), self.batch_size):
            idx = np.arange(start, min(start + self.batch_size, len(ids)))
            n = len(idx)
            weights = np.ones(self.batch_size, np.float32)
            weights[n:] = 0
            idx_full = np.resize(idx, self.batch_size)
            length = next(b for b in self.buckets if b >= lengths[idx_full].max())
            yield n, collate(split, idx_full, weights, length, self.pad_id)

    def probs(self, words_list: list[list[str]], labels: np.ndarray) -> np.ndarray:
        out = []
        for n, batch in self._batches(self._encode(words_list), labels):
            out.append(np.asarray(self._probs(self.params, jax.tree.map(jnp.asarray, batch)))[:n])
        return np.concatenate(out)

    def word_saliency(self, words_list: list[list[str]], labels: np.ndarray) -> list[np.ndarray]:
        encodings = self._encode(words_list)
        token_saliency = []
        for n, batch in self._batches(encodings, labels):
            s = np.asarray(self._saliency(self.params, jax.tree.map(jnp.asarray, batch)))
            token_saliency.extend(s[:n])
        out = []
        for words, enc, sal in zip(words_list, encodings, token_saliency, strict=True):
            per_word = np.zeros(len(words))
            for t, w in enumerate(enc.word_ids):
                if w is not None:
                    per_word[w] += sal[t]
            out.append(per_word)
        return out


def char_attack(model: nnx.Module, tokenizer, split: Split, max_length: int, buckets: tuple[int, ...],
                pad_id: int, max_words: int = 5, batch_size: int = 128, seed: int = 0) -> dict[str, float]:
    """The character-level attack over every example of `split` (its `texts`); see the module docstring."""
    rng = np.random.default_rng(seed)
    clf = _Classifier(model, tokenizer, max_length, buckets, pad_id, batch_size)
    labels = split.labels
    words = [text.split() for text in split.texts]
    clean = clf.probs(words, labels)
    correct = clean.argmax(-1) == labels
    active = np.flatnonzero(correct & np.array([len(w) > 0 for w in words]))
    queries = np.ones(len(words))  # the clean prediction
    attacked = {int(i): list(words[i]) for i in active}
    order = {}
    if len(active):
        saliency = clf.word_saliency([words[i] for i in active], labels[active])
        queries[active] += 1
        order = {int(i): list(np.argsort(-s, kind="stable")) for i, s in zip(active, saliency, strict=True)}
    flipped = np.zeros(len(words), bool)
    true_prob = {int(i): clean[i, labels[i]] for i in active}
    for rank in range(max_words):
        todo = [i for i in attacked if not flipped[i] and rank < len(order[i])]
        if not todo:
            break
        candidates, owners = [], []
        for i in todo:
            position = order[i][rank]
            for edit in char_edits(attacked[i][position], rng):
                candidate = list(attacked[i])
                candidate[position] = edit
                candidates.append(candidate)
                owners.append(i)
        probs = clf.probs(candidates, labels[owners])
        for i in todo:
            rows = [r for r, o in enumerate(owners) if o == i]
            queries[i] += len(rows)
            best = min(rows, key=lambda r: probs[r, labels[i]])
            if probs[best, labels[i]] < true_prob[i]:  # keep the edit only if it helps the attack
                attacked[i] = candidates[best]
                true_prob[i] = probs[best, labels[i]]
            if probs[best].argmax() != labels[i]:
                flipped[i] = True
    n_correct = int(correct.sum())
    return {"accuracy": float((correct & ~flipped).mean()), "clean_accuracy": float(correct.mean()),
            "success_rate": float(flipped.sum() / max(n_correct, 1)),
            "queries_per_example": float(queries[active].mean()) if len(active) else 0.0}
