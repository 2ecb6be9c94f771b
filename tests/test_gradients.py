"""Loss and the gradient of every parameter against PyTorch: cross-entropy on a BERT classification head and
the masked causal-LM loss on GPT-2. Tolerance: per tensor, |ours - torch| <= 1e-4 * max|torch| (1e-4
relative to the tensor's scale); loss within 1e-5 relative."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import assert_grads_match, our_grads_by_hf_name, randomize_

from research.batch import Batch
from research.models import from_pretrained


def test_bert_classification_loss_and_grads(tmp_path):

    cfg = transformers.BertConfig(vocab_size=83, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, num_labels=3, attn_implementation="eager")
    theirs = randomize_(transformers.BertForSequenceClassification(cfg), seed=7)
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, "sequence_classification")

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 83, (4, 10))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 2:] = 0
    labels = np.array([0, 2, 1, 2])

    loss_t = F.cross_entropy(theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits,
                             torch.tensor(labels))
    loss_t.backward()

    def loss_fn(model):
        logits = model(jnp.asarray(ids), jnp.asarray(mask))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()

    loss, grads = our_grads_by_hf_name(ours, loss_fn, "sequence_classification")
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
    assert_grads_match(grads, theirs)


def test_gpt2_causal_lm_loss_and_grads(tmp_path):

    cfg = transformers.GPT2Config(vocab_size=91, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  attn_implementation="eager", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    theirs = randomize_(transformers.GPT2LMHeadModel(cfg), seed=8)
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path, "causal_lm")

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 91, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding, excluded from the loss
    labels = np.where(mask == 1, ids, -100)

    out = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()

    def loss_fn(model):
        logits = model(jnp.asarray(ids), jnp.asarray(mask))[:, :-1]  # predict token t+1 from <= t
        targets, weights = jnp.asarray(ids)[:, 1:], jnp.asarray(mask)[:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return (nll * weights).sum() / weights.sum()

    loss, grads = our_grads_by_hf_name(ours, loss_fn, "causal_lm")
    np.testing.assert_allclose(loss, out.loss.item(), rtol=1e-5)
    assert_grads_match(grads, theirs)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_task_loss_equals_torch_cross_entropy(smoothing):
    """The supervised loss (research/objectives/supervised.task_loss) per example and per token, weighted,
    with and without label smoothing (two code paths: integer labels, or smoothed one-hot targets)."""
    from research.objectives.supervised import task_loss

    rng = np.random.default_rng(3)
    logits, labels = rng.normal(size=(3, 5, 7)).astype(np.float32), rng.integers(0, 7, (3, 5))
    w = (rng.random((3, 5)) > 0.3).astype(np.float32)
    each = F.cross_entropy(torch.tensor(logits).reshape(15, 7), torch.tensor(labels).reshape(15),
                           reduction="none", label_smoothing=smoothing).numpy().reshape(3, 5)
    ids = jnp.zeros((3, 5), jnp.int32)  # the loss reads only labels and weights
    tokens = Batch(input_ids=ids, attention_mask=ids + 1, labels=jnp.asarray(labels), weights=jnp.ones(3),
                   label_weights=jnp.asarray(w))
    loss, aux = task_loss(jnp.asarray(logits), tokens, smoothing)
    np.testing.assert_allclose(loss, (each * w).sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(aux["accuracy"], ((logits.argmax(-1) == labels) * w).sum() / w.sum(), rtol=1e-6)
    per_example = Batch(input_ids=ids, attention_mask=ids + 1, labels=jnp.asarray(labels[:, 0]),
                        weights=jnp.asarray(w[:, 0]))
    loss, _ = task_loss(jnp.asarray(logits[:, 0]), per_example, smoothing)
    np.testing.assert_allclose(loss, (each[:, 0] * w[:, 0]).sum() / w[:, 0].sum(), rtol=1e-6)
