"""Adversarial objectives against PyTorch implementations of the published algorithms, written here.

Each test builds a tiny BERT classifier in transformers with random weights, loads the same weights into ours,
draws the objective's random numbers once (with JAX, handed to both), and compares the loss (1e-5 relative)
and the gradient of every parameter (1e-4 of each tensor's scale, as tests/test_gradients.py). Dropout is off
so that both frameworks compute the same function. Then the properties: a zero-size perturbation is
supervised training, perturbations respect epsilon and never touch padding (padded and packed rows), and the
inner maximization does not decrease what it maximizes.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from helpers import (
    KEY,
    assert_grads_match,
    check_objective,
    deterministic,
    our_grads_by_hf_name,
    records,
    smoke,
    step_dirs,
    tiny_batch,
)

from research.batch import Batch
from research.data.batches import collate, pack
from research.data.split import Split, SplitReport
from research.models import bert
from research.models.hf import _hf_key, key_table
from research.objectives import adversarial as adv
from research.objectives.supervised import CrossEntropyOptions, cross_entropy
from research.train import train


@pytest.fixture(scope="module")
def batch():
    return tiny_batch()


class Torch:
    """The reference side: the tiny torch model on the batch, and the geometry every algorithm uses."""

    def __init__(self, model, batch):
        self.model, self.ids = model, torch.tensor(batch.input_ids).long()
        self.mask = torch.tensor(batch.attention_mask).long()
        self.mask3 = self.mask[..., None].float()
        self.labels = torch.tensor(batch.labels).long()
        model.zero_grad(set_to_none=True)

    def embed(self):
        return self.model.bert.embeddings.word_embeddings(self.ids)

    def logits(self, embeds):
        return self.model(inputs_embeds=embeds, attention_mask=self.mask).logits

    def loss(self, logits):
        return F.cross_entropy(logits, self.labels)

    def norm(self, x):  # per-example L2 over tokens and dimensions, as FreeLB's reference: (B, 1, 1)
        return x.reshape(x.shape[0], -1).norm(dim=1).view(-1, 1, 1)

    def unit(self, g):  # padding first masked out: it is never perturbed, nor counted in a norm
        g = g * self.mask3
        return g / self.norm(g).clamp(min=adv.TINY)

    def kl(self, p_logits, q_logits):  # KL(p || q), mean over examples
        log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def ours(model, objective, batch, key=KEY):
    """Our loss and gradients (by transformers parameter name) for `objective`."""
    b = jax.tree.map(jnp.asarray, batch)
    return our_grads_by_hf_name(model, lambda m: objective(m, b, key)[0], "sequence_classification")


def to_torch(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x))


# -------------------------------------------------------------------------------- parity with PyTorch


def test_fgm_matches_pytorch(tiny_bert_pair, batch):
    o = adv.FGMOptions(epsilon=0.7, adversarial_weight=0.5)
    t = Torch(tiny_bert_pair[0], batch)
    e = t.embed()
    e.retain_grad()
    clean = t.loss(t.logits(e))
    clean.backward()  # parameter gradients of the clean loss, and g = dL/de
    r = o.epsilon * t.unit(e.grad)
    adversarial = o.adversarial_weight * t.loss(t.logits(t.embed() + r.detach()))
    adversarial.backward()  # accumulated: the gradient of clean + w * adversarial
    check_objective(tiny_bert_pair, adv.fgm(o), clean + adversarial, batch)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_matches_pytorch(tiny_bert_pair, batch, norm):
    o = adv.PGDOptions(epsilon=0.5 if norm == "l2" else 0.02, alpha=0.3 if norm == "l2" else 0.01, steps=3,
                       norm=norm, clean_weight=0.5)
    t = Torch(tiny_bert_pair[0], batch)
    delta = torch.zeros(*batch.input_ids.shape, 32)
    for _ in range(o.steps):
        d = delta.clone().requires_grad_()
        (g,) = torch.autograd.grad(t.loss(t.logits(t.embed().detach() + d)), d)
        if norm == "l2":
            delta = delta + o.alpha * t.unit(g)
            n = t.norm(delta)
            delta = torch.where(n > o.epsilon, delta * o.epsilon / n.clamp(min=adv.TINY), delta)
        else:
            delta = (delta + o.alpha * g.sign() * t.mask3).clamp(-o.epsilon, o.epsilon)
    loss = o.clean_weight * t.loss(t.logits(t.embed())) + t.loss(t.logits(t.embed() + delta.detach()))
    loss.backward()
    check_objective(tiny_bert_pair, adv.pgd(o), loss, batch)


def test_freelb_matches_pytorch(tiny_bert_pair, batch):
    # FreeLB's reference loop: K forward/backward passes, each loss divided by K, parameter gradients
    # accumulated; delta from its uniform init, ascended and projected between passes.
    o = adv.FreeLBOptions(steps=3, alpha=0.3, init_magnitude=0.5, epsilon=0.6)
    t = Torch(tiny_bert_pair[0], batch)
    B, T = batch.input_ids.shape
    uniform = to_torch(jax.random.uniform(KEY, (B, T, 32), jnp.float32, -1.0, 1.0))
    lengths = t.mask.sum(1).view(-1, 1, 1).float()
    delta = uniform * t.mask3 * (o.init_magnitude / torch.sqrt(lengths * 32))
    n = t.norm(delta)
    delta = torch.where(n > o.epsilon, delta * o.epsilon / n, delta)
    total = 0.0
    for step in range(o.steps):
        delta.requires_grad_()
        loss = t.loss(t.logits(t.embed() + delta)) / o.steps
        total += loss.detach()
        loss.backward()
        if step == o.steps - 1:
            break
        delta = (delta + o.alpha * t.unit(delta.grad)).detach()
        n = t.norm(delta)
        delta = torch.where(n > o.epsilon, delta * o.epsilon / n, delta).detach()
    check_objective(tiny_bert_pair, adv.freelb(o), total, batch)


def test_smart_smoothness_matches_pytorch(tiny_bert_pair, batch):
    o = adv.SMARTOptions(lambda_s=2.0, epsilon=0.05, noise_std=0.02, step_size=0.03, steps=2, mu=0.0)
    t = Torch(tiny_bert_pair[0], batch)
    sym = lambda p, q: t.kl(p, q) + t.kl(q, p)  # noqa: E731
    e = t.embed()
    clean_logits = t.logits(e)
    noise = o.noise_std * to_torch(jax.random.normal(KEY, (*batch.input_ids.shape, 32))) * t.mask3
    for _ in range(o.steps):
        d = noise.clone().requires_grad_()
        (g,) = torch.autograd.grad(sym(clean_logits.detach(), t.logits(e.detach() + d)), d)
        g_max = g.abs().reshape(g.shape[0], -1).max(1).values.view(-1, 1, 1)
        noise = (noise + o.step_size * g / g_max.clamp(min=adv.TINY) * t.mask3).clamp(-o.epsilon, o.epsilon)
    loss = t.loss(clean_logits) + o.lambda_s * sym(clean_logits, t.logits(e + noise.detach()))
    loss.backward()
    check_objective(tiny_bert_pair, adv.smart(o), loss, batch)


def test_vat_matches_pytorch(tiny_bert_pair, batch):
    # xi is raised from the paper's 1e-6: at 1e-6 the float32 power-iteration gradient is rounding noise in
    # either framework, and two noises need not agree.
    o = adv.VATOptions(epsilon=0.8, xi=0.3, power_iterations=2, alpha=0.7)
    t = Torch(tiny_bert_pair[0], batch)
    e = t.embed()
    clean_logits = t.logits(e)
    held = clean_logits.detach()
    d = t.unit(to_torch(jax.random.normal(KEY, (*batch.input_ids.shape, 32))))
    for _ in range(o.power_iterations):
        dd = (o.xi * d).requires_grad_()
        (g,) = torch.autograd.grad(t.kl(held, t.logits(e.detach() + dd)), dd)
        d = t.unit(g)
    loss = t.loss(clean_logits) + o.alpha * t.kl(held, t.logits(e + (o.epsilon * d).detach()))
    loss.backward()
    check_objective(tiny_bert_pair, adv.vat(o), loss, batch)


def test_smart_bregman_proximal_point_matches_pytorch(tiny_bert_pair, batch):
    # The teacher before the step is some earlier average (here: the weights plus noise); the loss first moves
    # it to (1 - beta) theta + beta theta~, then adds mu * symKL(f(x; theta), f(x; theta~) held).
    o = adv.SMARTOptions(lambda_s=0.5, epsilon=0.05, noise_std=0.02, step_size=0.03, steps=1, mu=1.5, beta=0.9)
    theirs, mine = tiny_bert_pair
    objective = adv.smart(o)
    params = nnx.to_pure_dict(nnx.state(mine, nnx.Param))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    previous = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                            for x, k in zip(leaves, keys, strict=True)])
    b = jax.tree.map(jnp.asarray, batch)
    _, _, new_teacher = objective.loss(mine, b, KEY, previous)
    for got, p, q in zip(jax.tree.leaves(new_teacher), leaves, jax.tree.leaves(previous), strict=True):
        np.testing.assert_allclose(got, (1 - o.beta) * p + o.beta * q, rtol=1e-6, atol=1e-7)
    loss, grads = our_grads_by_hf_name(mine, lambda m: objective.loss(m, b, KEY, previous)[0],
                                       "sequence_classification")

    # Torch: the teacher is a copy of the model holding the averaged weights, named as transformers names them.
    teacher = copy.deepcopy(theirs).eval()
    table = {path: (key, transpose) for key, (path, transpose) in key_table(bert.FAMILY, mine.config,
                                                                            "sequence_classification").items()}
    averaged = jax.tree.map(lambda p, q: (1 - o.beta) * p + o.beta * q, params, previous)
    state = nnx.state(mine, nnx.Param)
    nnx.replace_by_pure_dict(state, averaged)
    named = {}
    for path, value in nnx.to_flat_state(state):
        key, transpose = table[path]
        v = np.asarray(value[...])
        named[_hf_key(bert.FAMILY, key, path, "sequence_classification")] = torch.tensor(v.T if transpose else v)
    teacher.load_state_dict(named, strict=False)  # tied/buffer entries keep the model's own
    t = Torch(theirs, batch)
    sym = lambda p, q: t.kl(p, q) + t.kl(q, p)  # noqa: E731
    e = t.embed()
    clean_logits = t.logits(e)
    noise = o.noise_std * to_torch(jax.random.normal(KEY, (*batch.input_ids.shape, 32))) * t.mask3
    d = noise.clone().requires_grad_()
    (g,) = torch.autograd.grad(sym(clean_logits.detach(), t.logits(e.detach() + d)), d)
    g_max = g.abs().reshape(g.shape[0], -1).max(1).values.view(-1, 1, 1)
    noise = (noise + o.step_size * g / g_max.clamp(min=adv.TINY) * t.mask3).clamp(-o.epsilon, o.epsilon)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=t.ids, attention_mask=t.mask).logits
    torch_loss = (t.loss(clean_logits) + o.lambda_s * sym(clean_logits, t.logits(e + noise.detach()))
                  + o.mu * sym(clean_logits, teacher_logits))
    torch_loss.backward()
    np.testing.assert_allclose(loss, float(torch_loss.detach()), rtol=1e-5)
    assert_grads_match(grads, theirs)


# ------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("objective,factor", [
    (adv.fgm(adv.FGMOptions(epsilon=0.0, adversarial_weight=0.5)), 1.5),  # clean + 0.5 * clean
    (adv.pgd(adv.PGDOptions(epsilon=0.0, random_start=True)), 1.0),
    (adv.freelb(adv.FreeLBOptions(epsilon=0.0)), 1.0),
    (adv.smart(adv.SMARTOptions(epsilon=0.0, noise_std=0.0, mu=0.0)), 1.0),
    (adv.vat(adv.VATOptions(epsilon=0.0)), 1.0),
], ids=["fgm", "pgd", "freelb", "smart", "vat"])
def test_a_zero_perturbation_is_supervised_training(tiny_bert_pair, batch, objective, factor):
    loss, grads = ours(tiny_bert_pair[1], objective, batch)
    ce_loss, ce_grads = ours(tiny_bert_pair[1], cross_entropy(CrossEntropyOptions()), batch)
    np.testing.assert_allclose(loss, factor * ce_loss, rtol=1e-6)
    for name, g in ce_grads.items():
        np.testing.assert_allclose(grads[name], factor * g, rtol=1e-5, atol=1e-7, err_msg=name)


def aux_of(model, objective, batch, key=KEY):
    return {k: float(v) for k, v in objective(model, jax.tree.map(jnp.asarray, batch), key)[1].items()}


@pytest.mark.parametrize("seed", range(3))
def test_perturbations_stay_in_the_ball_and_maximization_does_not_decrease_the_loss(tiny_bert_pair, batch, seed):
    model, key = tiny_bert_pair[1], jax.random.key(seed)
    for norm, eps, alpha in [("l2", 0.5, 0.4), ("linf", 0.03, 0.02)]:
        a = aux_of(model, adv.pgd(adv.PGDOptions(epsilon=eps, alpha=alpha, steps=4, norm=norm, random_start=True)),
                   batch, key)
        assert a["delta_max_norm"] <= eps * (1 + 1e-6)
        b = aux_of(model, adv.pgd(adv.PGDOptions(epsilon=eps, alpha=alpha, steps=4, norm=norm)), batch, key)
        assert b["adversarial_loss"] >= b["first_step_loss"]  # the first step starts from the clean input
    f = aux_of(model, adv.freelb(adv.FreeLBOptions(epsilon=0.4, alpha=0.3, init_magnitude=1.0)), batch, key)
    assert f["delta_max_norm"] <= 0.4 * (1 + 1e-6) and f["last_step_loss"] >= f["first_step_loss"]
    s = aux_of(model, adv.smart(adv.SMARTOptions(epsilon=0.05, noise_std=0.01, step_size=0.05, steps=2, mu=0.0)),
               batch, key)
    assert s["delta_max_norm"] <= 0.05 * (1 + 1e-6) and s["smoothness"] >= s["first_step_smoothness"]
    g = aux_of(model, adv.fgm(adv.FGMOptions(epsilon=0.5)), batch, key)
    np.testing.assert_allclose(g["delta_max_norm"], 0.5, rtol=1e-5)
    assert g["adversarial_loss"] >= g["clean_loss"]


def ragged_split(n=8, max_length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 83, k).astype(np.int32) for k in rng.integers(2, max_length + 1, n)]
    return Split("s", ids, [np.zeros(len(x), np.int32) for x in ids], rng.integers(0, 3, n).astype(np.int32),
                 [""] * n, SplitReport("s", ""))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_padding_is_never_perturbed_and_norms_are_per_example(tiny_bert_pair, layout):
    split = ragged_split()
    idx, w = np.arange(8), np.ones(8, np.float32)
    batch = collate(split, idx, w, 12, 0) if layout == "padded" else pack(split, idx, w, 24, 0)
    b = jax.tree.map(jnp.asarray, batch)
    x = jax.random.normal(KEY, (*batch.input_ids.shape, 32))
    padding = batch.attention_mask == 0
    for delta in [adv.normalize(x, b, "l2"), adv.normalize(x, b, "linf"), adv.freelb_init(KEY, x, b, 1.0),
                  adv.random_start(KEY, x, b, 0.5, "l2"), adv.random_start(KEY, x, b, 0.5, "linf")]:
        assert np.all(np.asarray(delta)[padding] == 0)
    # Every example of a unit-normalized direction has norm 1, computed here example by example.
    unit = np.asarray(adv.normalize(x, b, "l2"))
    seg = batch.segments()
    for row in range(seg.shape[0]):
        for s in set(seg[row]) - {0}:
            np.testing.assert_allclose(np.linalg.norm(unit[row][seg[row] == s]), 1.0, rtol=1e-5)
    # A packed batch's objective equals the padded batch's (the same examples, the same perturbations'
    # geometry): checked on FGM, whose perturbation depends on no random draw.
    theirs_batch = collate(split, idx, w, 12, 0)
    fgm = adv.fgm(adv.FGMOptions(epsilon=0.5))
    padded_loss, _ = fgm(tiny_bert_pair[1], jax.tree.map(jnp.asarray, theirs_batch), KEY)
    this_loss, _ = fgm(tiny_bert_pair[1], b, KEY)
    np.testing.assert_allclose(float(this_loss), float(padded_loss), rtol=1e-5)


def test_objectives_are_registered_with_their_options():
    from research.config import ConfigError, ObjectiveConfig
    from research.objectives import OBJECTIVES, make_objective

    assert {"fgm", "pgd", "freelb", "smart", "vat"} <= set(OBJECTIVES)
    with pytest.raises(ConfigError, match="epsilonn"):
        make_objective(ObjectiveConfig(name="pgd", params={"epsilonn": 1.0}))
    assert callable(make_objective(ObjectiveConfig(name="freelb", params={"steps": 2})))


def test_nnx_state_is_usable_after_an_objective(tiny_bert_pair, batch):
    # The inner nnx.value_and_grad passes must leave the module usable (no leaked tracers).
    model = tiny_bert_pair[1]
    adv.freelb(adv.FreeLBOptions())(model, jax.tree.map(jnp.asarray, batch), KEY)
    out = model(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask))
    assert np.isfinite(np.asarray(out)).all()
    assert isinstance(nnx.state(model), nnx.State)


# ---------------------------------------------------------------------------------------- through the runner


# One of them through the whole runner (config -> make_objective -> jitted train step -> metrics.jsonl): FreeLB,
# the one with the longest inner loop; SMART goes through it in the resume test below. FGM, PGD and VAT take
# the same path, their losses and gradients are checked against PyTorch above, and
# `research sweep experiments/sst2_robust.py` trains every one for real; each runner test costs ~30-50 s, which is
# why not all.
@pytest.mark.parametrize("name", ["freelb"])
def test_objectives_train_through_the_runner(tmp_path, data_dir, name):
    train(smoke(f"objective.name=\"{name}\"", "train.max_steps=2", "train.eval_every=null", "train.log_every=1",
                "data.pack_length=32"), tmp_path)
    logged = [r for r in records(tmp_path) if "train/loss" in r]
    assert len(logged) == 2 and all(np.isfinite(r["train/loss"]) for r in logged)
    assert all("train/delta_norm" in r for r in logged)  # the objective's own metrics reach metrics.jsonl


def test_smart_teacher_state_is_checkpointed_and_resumes_bit_exactly(tmp_path, data_dir):
    # SMART with the proximal point carries a teacher copy of the parameters in the train state: a run resumed
    # from a checkpoint must equal the uninterrupted one, teacher included. Half the smoke run (8 steps, resumed
    # from step 4's checkpoint) in one bucket. In-process: a real SIGKILL and its resume are
    # test_reliability.py's subject, for any train state; here the state is SMART's.
    cfg = smoke("objective.name=\"smart\"", "objective.params={\"epsilon\": 0.01}", "train.max_steps=8",
                "data.buckets=[32]")
    train(cfg, tmp_path)
    reference = deterministic(records(tmp_path))
    assert step_dirs(tmp_path) == [4, 8] and any("train/bregman" in r for r in reference)
    train(cfg, tmp_path, resume=True, resume_step=4)  # steps 5-8 again, from step 4's parameters and teacher
    assert deterministic(records(tmp_path)) == reference
    # (Were the teacher not restored, the resumed run would restart it from the resumed weights, and its
    # train/bregman values would differ from the reference's.)


# ------------------------------------------------------------------------------------------- every head


def head_batch(head: str):
    """A tiny model of `head` and a right-padded batch with the labels that head trains on."""
    from research.models import from_config
    from research.models.bert import BertConfig
    from research.models.gpt2 import GPT2Config

    rng = np.random.default_rng(4)
    ids = rng.integers(1, 50, (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "weights": np.ones(3, np.float32)}  # -> a Batch below
    if head.startswith("bert"):  # GPT-2 batches carry no token types (see Split.token_type_ids)
        batch["token_type_ids"] = np.zeros_like(ids)
        model = from_config(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=24, num_labels=5), "token_classification")
        batch.update(labels=rng.integers(0, 5, ids.shape).astype(np.int32), label_weights=mask.astype(np.float32))
    elif head == "gpt2_causal_lm":
        model = from_config(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2), "causal_lm")
        # Next-token labels: position t predicts token t + 1; the last position and padding carry no weight.
        batch.update(labels=np.roll(ids, -1, axis=1),
                     label_weights=(mask * np.roll(mask, -1, axis=1) * (np.arange(9) < 8)).astype(np.float32))
    else:
        model = from_config(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=3),
                            "sequence_classification")
        batch.update(labels=np.array([0, 2, 1], np.int32))
    return model, jax.tree.map(jnp.asarray, Batch(**batch))


@pytest.mark.parametrize("head", ["bert_token_classification", "gpt2_causal_lm", "gpt2_sequence_classification"])
def test_every_objective_works_on_every_head(head):
    from research.objectives.supervised import task_loss

    model, b = head_batch(head)
    clean, _ = task_loss(model(b.input_ids, b.attention_mask), b)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    objectives = {
        "fgm": (adv.fgm(adv.FGMOptions()), adv.fgm(adv.FGMOptions(epsilon=0.0, adversarial_weight=0.0))),
        "pgd": (adv.pgd(adv.PGDOptions(random_start=True)), adv.pgd(adv.PGDOptions(epsilon=0.0))),
        "freelb": (adv.freelb(adv.FreeLBOptions()), adv.freelb(adv.FreeLBOptions(epsilon=0.0))),
        "smart": (adv.smart(adv.SMARTOptions()), adv.smart(adv.SMARTOptions(epsilon=0.0, noise_std=0.0, mu=0.0))),
        "vat": (adv.vat(adv.VATOptions()), adv.vat(adv.VATOptions(epsilon=0.0))),
    }
    for name, (default, zero) in objectives.items():
        if isinstance(default, adv.StatefulObjective):
            loss, aux, _ = default.loss(model, b, KEY, params)
        else:
            loss, aux = default(model, b, KEY)
        assert np.isfinite(float(loss)), name
        if name in ("fgm", "smart", "vat"):  # clean loss + non-negative terms
            assert float(loss) >= float(clean) - 1e-6, name
        zero_loss, _ = zero(model, b, KEY)
        np.testing.assert_allclose(float(zero_loss), float(clean), rtol=1e-6, err_msg=name)
