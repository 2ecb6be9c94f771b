"""IRMv1, V-REx and Group DRO against PyTorch implementations written here after the papers' code (the
IRM / REx Colored MNIST scripts, Sagawa et al.'s loss computer): the loss 1e-5 relative and the gradient of
every parameter 1e-4, on the tiny BERT of tests/test_adversarial.py with two environments. Then annealing
(the penalty weight switches at exactly the configured update, also in a real run) and the optimizer reset."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from helpers import check_objective, smoke

from research.batch import Batch
from research.config import ConfigError, ObjectiveConfig, OptimConfig
from research.objectives import invariance as inv
from research.objectives import make_objective
from research.optim import reset_at
from research.train import train

ENVS = ("a", "b")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 83, (8, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    mask[5, 4:] = 0
    return Batch(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids),
                 labels=np.array([0, 2, 1, 2, 0, 1, 1, 0], np.int32), weights=np.ones(8, np.float32),
                 environment=np.array([0, 1, 1, 0, 0, 1, 0, 1], np.int32))


class TorchEnvs:
    """The reference: per-environment logits and labels of the tiny torch model."""

    def __init__(self, model, batch):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=torch.tensor(batch.input_ids).long(),
                       attention_mask=torch.tensor(batch.attention_mask).long()).logits
        labels = torch.tensor(batch.labels).long()
        env = batch.environment
        self.envs = [(logits[torch.tensor(env == e)], labels[torch.tensor(env == e)]) for e in range(len(ENVS))]

    def risks(self):
        return torch.stack([F.cross_entropy(lg, y) for lg, y in self.envs])


def irm_penalty(logits, y):  # Arjovsky et al.'s code: the squared gradient of the risk w.r.t. a dummy scale
    scale = torch.tensor(1.0, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits * scale, y), [scale], create_graph=True)
    return (grad**2).sum()


def irm_penalty_unbiased(logits, y):  # DomainBed's: halves by alternate examples, product of the gradients
    scale = torch.tensor(1.0, requires_grad=True)
    (g1,) = torch.autograd.grad(F.cross_entropy(logits[0::2] * scale, y[0::2]), [scale], create_graph=True)
    (g2,) = torch.autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), [scale], create_graph=True)
    return (g1 * g2).sum()


def stateless(objective, state):
    return lambda m, b, k: objective.loss(m, b, k, state)[:2]


@pytest.mark.parametrize("updates", [0.0, 7.0])  # before and after annealing (anneal_steps=7)
@pytest.mark.parametrize("unbiased", [False, True])
def test_irm_matches_pytorch(tiny_bert_pair, batch, updates, unbiased):
    o = inv.IRMOptions(penalty_weight=50.0, anneal_steps=7, unbiased=unbiased)
    t = TorchEnvs(tiny_bert_pair[0], batch)
    penalty_fn = irm_penalty_unbiased if unbiased else irm_penalty
    nll = t.risks().mean()
    penalty = torch.stack([penalty_fn(lg, y) for lg, y in t.envs]).mean()
    weight = 50.0 if updates >= 7 else 1.0
    loss = nll + weight * penalty
    if weight > 1.0:
        loss = loss / weight
    loss.backward()
    check_objective(tiny_bert_pair, stateless(inv.irm(o, ENVS), {"updates": jnp.float32(updates)}), loss, batch)


@pytest.mark.parametrize("updates", [0.0, 7.0])
def test_vrex_matches_pytorch(tiny_bert_pair, batch, updates):
    o = inv.VRExOptions(penalty_weight=30.0, anneal_steps=7)
    risks = TorchEnvs(tiny_bert_pair[0], batch).risks()
    weight = 30.0 if updates >= 7 else 1.0
    loss = risks.mean() + weight * ((risks - risks.mean()) ** 2).mean()
    if weight > 1.0:
        loss = loss / weight
    loss.backward()
    check_objective(tiny_bert_pair, stateless(inv.vrex(o, ENVS), {"updates": jnp.float32(updates)}), loss, batch)


def test_group_dro_matches_pytorch(tiny_bert_pair, batch):
    o = inv.GroupDROOptions(eta=0.5)
    q0 = torch.tensor([0.3, 0.7])
    risks = TorchEnvs(tiny_bert_pair[0], batch).risks()
    q = q0 * torch.exp(o.eta * risks.detach())  # Sagawa et al.'s LossComputer.compute_robust_loss
    q = q / q.sum()
    loss = risks @ q
    loss.backward()
    objective = inv.group_dro(o, ENVS)
    check_objective(tiny_bert_pair, stateless(objective, {"q": jnp.array([0.3, 0.7], jnp.float32)}), loss, batch)
    b = jax.tree.map(jnp.asarray, batch)
    _, aux, new = objective.loss(tiny_bert_pair[1], b, jax.random.key(0), {"q": jnp.array([0.3, 0.7], jnp.float32)})
    np.testing.assert_allclose(new["q"], q.numpy(), rtol=1e-5)
    np.testing.assert_allclose([aux["env/a/risk"], aux["env/b/risk"]], risks.detach().numpy(), rtol=1e-5)


def test_penalties_vanish_when_environments_agree(tiny_bert_pair, batch):
    # Two copies of the same examples, one per environment: equal risks, so V-REx's variance is 0 and
    # IRM's two penalties are equal; Group DRO's weights stay uniform.
    b = jax.tree.map(lambda v: jnp.asarray(np.concatenate([v, v])), batch)
    b = b.replace(environment=jnp.asarray(np.repeat([0, 1], 8)))
    _, aux, _ = inv.vrex(inv.VRExOptions(), ENVS).loss(tiny_bert_pair[1], b, None, {"updates": jnp.float32(0)})
    assert float(aux["penalty"]) < 1e-10
    _, aux, _ = inv.irm(inv.IRMOptions(), ENVS).loss(tiny_bert_pair[1], b, None, {"updates": jnp.float32(0)})
    np.testing.assert_allclose(aux["env/a/penalty"], aux["env/b/penalty"], rtol=1e-6)
    _, _, new = inv.group_dro(inv.GroupDROOptions(), ENVS).loss(tiny_bert_pair[1], b, None, {"q": jnp.full((2,), 0.5)})
    np.testing.assert_allclose(new["q"], [0.5, 0.5], rtol=1e-6)


def test_environment_objectives_need_environments():
    with pytest.raises(ConfigError, match="'irm' compares training environments, and the data has no environment"):
        make_objective(ObjectiveConfig(name="irm"))
    with pytest.raises(ConfigError, match="unknown config key 'objective.params.penalty'"):
        make_objective(ObjectiveConfig(name="vrex", params={"penalty": 1.0}), ENVS)


def test_optimizer_reset_starts_adam_afresh_at_the_step():
    grads = [{"w": jnp.array([0.5 * (i + 1), -1.0])} for i in range(6)]
    params = {"w": jnp.zeros(2)}
    tx = reset_at(optax.scale_by_adam(), 3)
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state)
        out.append(u["w"])
    fresh = optax.scale_by_adam()
    s = fresh.init(params)
    for i, g in enumerate(grads):
        if i == 3:
            s = fresh.init(params)  # what a new optimizer at update 3 would hold
        u, s = fresh.update(g, s)
        np.testing.assert_allclose(out[i], u["w"], rtol=1e-6)
    assert not np.allclose(out[3], optax.scale_by_adam().update(grads[3], state.inner)[0]["w"])


def test_irm_anneals_at_exactly_the_configured_step_in_a_run(tmp_path, data_dir):
    cfg = smoke('data.spurious={"train_agreements": [0.9, 0.8]}', 'objective.name="irm"',
                'objective.params={"penalty_weight": 100.0, "anneal_steps": 3}', "train.log_every=1",
                "train.max_steps=6", "optim.reset_at_step=3")
    train(cfg, tmp_path / "run")
    rs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    weights = {r["step"]: r["train/penalty_weight"] for r in rs if "train/penalty_weight" in r}
    # Metrics of step N come from update N - 1 (0-based): updates 0, 1, 2 have lambda 1, update 3 on 100.
    assert weights == {1: 1.0, 2: 1.0, 3: 1.0, 4: 100.0, 5: 100.0, 6: 100.0}
    names = {k for r in rs for k in r if k.startswith("train/env/")}
    assert {"train/env/agree0.9/risk", "train/env/agree0.8/accuracy", "train/env/agree0.8/penalty"} <= names
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert set(report["train"]["environment_counts"]) == {"agree0.9", "agree0.8"}
    assert OptimConfig().reset_at_step is None


def test_environment_objective_trains_a_gpt2_classifier_from_a_tokenizer_folder(tmp_path, data_dir):
    # The decoder row of the studies: a small random GPT-2 built from the data root's GPT-2 tokenizer files
    # (no config.json there: model.model_type names the architecture), trained with V-REx on the spurious data.
    gpt2 = ['model.name_or_path="data:tokenizers/gpt2"', 'model.init="scratch"', 'model.model_type="gpt2"',
            'model.overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64, "pad_token_id": 50256}']
    final = train(smoke(*gpt2, 'data.spurious={"train_agreements": [0.9, 0.8]}', 'objective.name="vrex"',
                        "train.max_steps=3", "train.log_every=1"), tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    assert config["model"]["model_type"] == "gpt2" and np.isfinite(final["dev/loss"])
    rs = [json.loads(x) for x in (tmp_path / "gpt2" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train/env/agree0.8/risk"]) for r in rs if "train/loss" in r)
    with pytest.raises(ConfigError, match="model.model_type='gpt2' builds a model from scratch"):
        smoke('model.model_type="gpt2"', 'model.init="pretrained"')
    no_pad = [*gpt2[:3], 'model.overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}']
    with pytest.raises(ConfigError, match="is a gpt2 without a pad token, which its classifier needs"):
        train(smoke(*no_pad), tmp_path / "no_pad")  # before any training step
    assert not (tmp_path / "no_pad" / "metrics.jsonl").exists()
