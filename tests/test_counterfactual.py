"""Counterfactual pair objectives (logit pairing, gradient supervision, pairwise margin) against PyTorch
implementations written here from the papers' definitions: loss 1e-5 relative, every parameter gradient 1e-4,
on the tiny BERT of tests/test_adversarial.py (dropout off). Pairs sit at examples (2p, 2p+1); the batch mixes
label-preserving and label-flipping pairs and a weight-0 filler pair, which must count in no term. Then the
same objectives on GPT-2's classification head, and through the runner on CAD's real pairs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import check_objective, smoke

from research.batch import Batch
from research.config import ConfigError
from research.objectives import counterfactual as cf
from research.train import train


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(9)
    ids = rng.integers(1, 83, (8, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 5:] = 0
    # Pairs: (0, 2) flips, (1, 1) preserves, (2, 0) flips, (1, 1) is filler (weight 0).
    return Batch(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids),
                 labels=np.array([0, 2, 1, 1, 2, 0, 1, 1], np.int32),
                 weights=np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32))


class TorchPairs:
    def __init__(self, model, batch):
        model.zero_grad(set_to_none=True)
        self.model = model
        out = model.bert(input_ids=torch.tensor(batch.input_ids).long(),
                         attention_mask=torch.tensor(batch.attention_mask).long())
        self.features = out.last_hidden_state[:, 0]  # (E, D): what the head reads
        self.labels = torch.tensor(batch.labels).long()
        self.w = torch.tensor(batch.weights)
        self.pairs = [(2 * p, 2 * p + 1) for p in range(len(batch.labels) // 2)]

    def head(self, f):
        return self.model.classifier(torch.tanh(self.model.bert.pooler.dense(f)))

    def ce(self, logits):
        return (F.cross_entropy(logits, self.labels, reduction="none") * self.w).sum() / self.w.sum()

    def members(self, keep):  # (i, j) both ways round for every real pair that `keep`s
        return [(i, j) for a, b in self.pairs for i, j in ((a, b), (b, a))
                if self.w[a] > 0 and keep(self.labels[a], self.labels[b])]


def test_logit_pairing_matches_pytorch(tiny_bert_pair, batch):
    t = TorchPairs(tiny_bert_pair[0], batch)
    logits = t.head(t.features)
    centred = logits - logits.mean(-1, keepdim=True)
    terms = [(centred[i] - centred[j]).abs().sum() for i, j in t.members(lambda a, b: a == b)]
    loss = t.ce(logits) + 0.7 * torch.stack(terms).mean()
    loss.backward()
    check_objective(tiny_bert_pair, cf.clp(cf.CLPOptions(weight=0.7)), loss, batch)


def test_gradient_supervision_matches_pytorch(tiny_bert_pair, batch):
    t = TorchPairs(tiny_bert_pair[0], batch)
    f = t.features
    logits = t.head(f)
    terms = []
    for i, j in t.members(lambda a, b: a != b):
        (g,) = torch.autograd.grad(t.head(f[i : i + 1])[0, t.labels[j]], f, create_graph=True)
        g = g[i]  # the score of x_j's label, differentiated at x_i
        terms.append(1 - F.cosine_similarity(g, f[j] - f[i], dim=0))
    loss = t.ce(logits) + 0.5 * torch.stack(terms).mean()
    loss.backward()
    check_objective(tiny_bert_pair, cf.gradient_supervision(cf.GradientSupervisionOptions(weight=0.5)), loss, batch)


def test_pair_margin_matches_pytorch(tiny_bert_pair, batch):
    t = TorchPairs(tiny_bert_pair[0], batch)
    z = t.head(t.features)
    terms = []
    for i, j in t.members(lambda a, b: a != b):
        yi, yj = t.labels[i], t.labels[j]
        change = (z[j, yj] - z[j, yi]) - (z[i, yj] - z[i, yi])
        terms.append(F.relu(2.0 - change))
    loss = t.ce(z) + 0.3 * torch.stack(terms).mean()
    loss.backward()
    check_objective(tiny_bert_pair, cf.pair_margin(cf.PairMarginOptions(weight=0.3, margin=2.0)), loss, batch)


def test_pair_terms_vanish_on_identical_members_and_work_on_gpt2(batch):
    from research.models import from_config
    from research.models.gpt2 import GPT2Config

    model = from_config(GPT2Config(vocab_size=83, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=3),
                        "sequence_classification")
    b = jax.tree.map(jnp.asarray, batch.replace(token_type_ids=None))  # GPT-2: no token types
    twins = b.replace(input_ids=jnp.repeat(b.input_ids[0::2], 2, 0),
                      attention_mask=jnp.repeat(b.attention_mask[0::2], 2, 0))
    key = jax.random.key(0)
    _, aux = cf.clp(cf.CLPOptions())(model, twins, key)
    assert float(aux["logit_pairing"]) == 0.0  # identical members: identical logits
    for objective in (cf.clp(cf.CLPOptions()), cf.gradient_supervision(cf.GradientSupervisionOptions()),
                      cf.pair_margin(cf.PairMarginOptions())):
        loss, aux = objective(model, b, key)
        assert np.isfinite(float(loss)) and float(loss) >= float(aux["cross_entropy"]) - 1e-6


def test_pair_objectives_train_on_cad_pairs_and_refuse_unpaired_data(tmp_path, data_dir):
    cad = ['data.train="cad_imdb/combined/paired/train_paired.tsv"', 'data.dev="cad_imdb/combined/dev.tsv"',
           'data.text_column="Text"', 'data.label_column="Sentiment"', 'data.labels=["Negative", "Positive"]',
           "data.max_train_examples=64", "data.max_dev_examples=16", 'data.pair_column="batch_id"']
    tests = 'data.test={"orig": "cad_imdb/orig/test.tsv", "new": "cad_imdb/new/test.tsv"}'
    final = train(smoke(*cad, tests, 'objective.name="gradient_supervision"', "train.max_steps=2",
                        "train.batch_size=16"), tmp_path / "gs")
    assert np.isfinite(final["dev/loss"])
    # data.test sets are evaluated beside dev, and reported (read like dev: max_dev_examples applies).
    assert {"orig/accuracy", "new/accuracy", "new/loss"} <= set(final)  # each test set under its own name
    report = json.loads((tmp_path / "gs" / "data_report.json").read_text())
    assert report["orig"]["used"] == report["new"]["used"] == 16 and report["orig"]["source"].endswith("orig/test.tsv")
    with pytest.raises(ConfigError, match="'pair_margin' works on counterfactual pairs: set data.pair_column"):
        train(smoke('objective.name="pair_margin"'), tmp_path / "unpaired")
