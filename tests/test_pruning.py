"""Magnitude pruning (research/compress/pruning.py): Zhu & Gupta's schedule, exact masks, and in the runner:
pruned weights exactly zero from the step they are pruned to the end, the masks resumed exactly, sparsity
logged, the export loadable by transformers, and bad settings refused."""

import shutil

import numpy as np
import pytest
import torch
from helpers import params_of, records, shakespeare_lm, smoke

from research.compress import pruning
from research.config import ConfigError, PruneConfig
from research.models import from_pretrained
from research.run import export_run
from research.train import train


def test_the_schedule_is_zhu_and_gupta_cubic():
    s = pruning.schedule_for(PruneConfig(method="magnitude", sparsity=0.9, initial_sparsity=0.1, begin=0.1, end=0.6,
                                         frequency=7), total_steps=100)
    assert (s.begin, s.end) == (10, 59)
    for t in (0, 10, 30, 59, 80):
        progress = min(max((t - 10) / 49, 0.0), 1.0)
        assert float(s.sparsity(t)) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - progress) ** 3)
    due = [t for t in range(100) if bool(s.due(t))]
    assert due == [10, 17, 24, 31, 38, 45, 52, 59]  # every 7 from t0, and t1 itself


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masks_prune_exactly_the_smallest_magnitudes(scope):
    rng = np.random.default_rng(0)
    weights = {"a": rng.normal(0, 1, (6, 5)).astype(np.float32), "b": rng.normal(0, 3, (4, 4)).astype(np.float32)}
    masks = pruning.magnitude_masks(weights, np.float32(0.4), scope)
    if scope == "layer":
        for k, w in weights.items():
            m = np.asarray(masks[k])
            assert (~m).sum() == int(0.4 * w.size)
            assert np.abs(w[~m]).max() < np.abs(w[m]).min()
    else:
        m = np.concatenate([np.asarray(masks[k]).ravel() for k in weights])
        w = np.concatenate([weights[k].ravel() for k in weights])
        assert (~m).sum() == int(0.4 * w.size)
        assert np.abs(w[~m]).max() < np.abs(w[m]).min()
        assert (~np.asarray(masks["a"])).mean() > (~np.asarray(masks["b"])).mean()  # b's weights are larger


PRUNE = ("prune.method=magnitude", "prune.sparsity=0.75", "prune.end=0.5", "prune.frequency=2", "train.log_every=2")
TARGETS = [f"bert/layers/0/{m}/kernel" for m in
           ("attention/query", "attention/key", "attention/value", "attention/output", "mlp/intermediate",
            "mlp/output")]


@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_pruned_weights_are_zero_resume_exactly_and_export(tmp_path, method):
    workdir = tmp_path / "pruned"
    prune = (*PRUNE, f"prune.method={method}")
    train(smoke(*prune), workdir)  # 16 steps: 75% reached at step 8 (the schedule's end) and kept
    step, params = params_of(workdir)
    assert step == 16
    for name in TARGETS:
        assert (params[name] == 0).mean() == pytest.approx(0.75, abs=1 / params[name].size), name
    assert all((v != 0).all() for k, v in params.items() if k.endswith("word_embeddings/embedding") or "pooler" in k)
    if method == "magnitude":  # masks fixed after the schedule's end (movement's follow the scores every step)
        _, at_12 = params_of_step(workdir, 12, tmp_path / "copy")
        for name in TARGETS:
            np.testing.assert_array_equal(at_12[name] == 0, params[name] == 0, err_msg=name)
    logged = [r for r in records(workdir) if "prune/sparsity" in r]
    curve = [r["prune/sparsity"] for r in logged]  # steps 2, 4, ..., 16: rising on the cubic, then flat
    assert [r["step"] for r in logged] == list(range(2, 17, 2)) and curve == sorted(curve)
    assert 0 <= curve[0] < curve[1] < 0.75 and curve[-1] == pytest.approx(0.75, abs=1e-3)
    assert "prune/sparsity/bert.encoder.layer.0.intermediate.dense" in logged[-1]

    # Resuming from step 12 redoes steps 13-16 bit for bit (the masks are optimizer state, checkpointed).
    before = [r["train/loss"] for r in records(workdir) if "train/loss" in r]
    train(smoke(*prune), workdir, resume=True, resume_step=12)
    assert [r["train/loss"] for r in records(workdir) if "train/loss" in r] == before
    _, resumed = params_of(workdir)
    for name in params:
        np.testing.assert_array_equal(resumed[name], params[name], err_msg=name)

    # The export is a plain transformers checkpoint with the zeros in it, and the same logits.
    import transformers

    export_run(workdir, tmp_path / "export", "latest")
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    weight = theirs.bert.encoder.layer[0].intermediate.dense.weight.detach().numpy()
    np.testing.assert_array_equal(weight.T == 0, params["bert/layers/0/mlp/intermediate/kernel"] == 0)
    ours = from_pretrained(tmp_path / "export", "sequence_classification")
    ids = np.random.default_rng(0).integers(1, 1000, (2, 7))
    np.testing.assert_allclose(np.asarray(ours(ids.astype(np.int32))),
                               theirs(input_ids=torch.tensor(ids)).logits.detach().numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("soft", [False, True])
def test_movement_pruning_is_straight_through_on_the_scores(soft):
    # Reference: the paper's formulation with explicit scores S, the model computing with W * M(S) and the
    # straight-through estimator (dL/dS = dL/dW' * W, dL/dW = dL/dW' * M), AdamW on W and Adam on S. Ours keeps W
    # and S in the optimizer state and the model holds W' alone: after 4 steps the same W', to 1e-6.
    import jax
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32), jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    w0 = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    loss = lambda w: ((x @ w - y) ** 2).mean()  # noqa: E731
    schedule = pruning.Schedule(initial=0.0, final=0.6, begin=0, end=3, frequency=1)
    lam, threshold = 50.0, 0.0

    def mask_of(scores, step):
        if soft:
            return scores > threshold
        return pruning.top_masks({"w": scores}, schedule.sparsity(step), "layer")["w"]

    inner, score_tx = optax.adamw(0.05, weight_decay=0.01), optax.adam(0.1)
    w, s, m = w0, jnp.zeros_like(w0), jnp.ones(w0.shape, bool)
    inner_state, score_state = inner.init(w), score_tx.init(s)
    for t in range(4):
        def ste_loss(w, s, m=m):
            reg = lam * jax.nn.sigmoid(s).mean() if soft else 0.0
            return loss(w * (m + s - jax.lax.stop_gradient(s))) + reg

        gw, gs = jax.grad(ste_loss, argnums=(0, 1))(w, s)
        uw, inner_state = inner.update(gw, inner_state, w)
        us, score_state = score_tx.update(gs, score_state, s)
        w, s = w + uw, s + us
        m = mask_of(s, t)

    tx = pruning.movement_pruner(optax.adamw(0.05, weight_decay=0.01), ["w"], schedule, "layer", 0.1, soft,
                                 threshold, lam)
    params = {"w": w0}
    state = tx.init(params)
    for _ in range(4):
        updates, state = tx.update(jax.grad(lambda p: loss(p["w"]))(params), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["w"]), np.asarray(w * m), rtol=0, atol=1e-6)
    assert (np.asarray(params["w"]) == 0).sum() == (~np.asarray(m)).sum() > 0


def params_of_step(workdir, step, scratch):
    """The parameters of checkpoint `step` of a run (a copy of it without the later checkpoints)."""
    shutil.copytree(workdir, scratch)
    for p in (scratch / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)
    return params_of(scratch, "latest")


@pytest.mark.parametrize(("overrides", "message"), [
    (["prune.method=magnitude", "prune.sparsity=1.0"], r"initial_sparsity \(0.0\) <= sparsity \(1.0\) < 1"),
    (["prune.method=magnitude", "prune.begin=0.8", "prune.end=0.5"], r"begin \(0.8\) <= end \(0.5\)"),
    (["prune.sparsity=0.9"], "prune.method is 'none'"),
    (["prune.method=magnitude", "peft.method=lora"], "PEFT freezes the weights pruning would zero"),
    (["prune.method=soft_movement"], "set it above 0"),
    (["prune.method=movement", "prune.regularization=1.0"], "soft movement pruning's"),
])
def test_bad_pruning_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        smoke(*overrides)


def test_a_target_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="prune.targets: 'nothing_here' matches no layer"):
        train(smoke("prune.method=magnitude", "prune.targets=[\"nothing_here\"]"), tmp_path / "x")


def test_gpt2_prunes_its_block_linears(tiny_gpt2_dir, data_dir, tmp_path):
    from research.config import OptimConfig

    cfg = shakespeare_lm(tiny_gpt2_dir, tmp_path, data_dir, optim=OptimConfig(lr=1e-3),
                         prune=PruneConfig(method="magnitude", sparsity=0.5, end=0.5, frequency=1))
    train(cfg, tmp_path / "lm")
    _, params = params_of(tmp_path / "lm")
    kernels = [k for k in params if k.startswith("transformer/h/") and k.endswith("kernel")]
    assert len(kernels) == 8
    for name in kernels:
        assert (params[name] == 0).mean() == pytest.approx(0.5, abs=1 / params[name].size), name
    assert (params["transformer/wte/embedding"] != 0).all()  # the tied embedding is not a target
