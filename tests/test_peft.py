"""PEFT (research/peft/) against PyTorch: `peft` itself for LoRA and IA3, a reference written here for the
bottleneck adapters (which peft lacks); on small random BERT and GPT-2 models of every head, padded batches.

- logits equal to 1e-5 (of their scale), the gradient of every trained tensor to 1e-4 (of its scale), the
  adapters handed over through peft's own directory format (so `peft.init_from` is tested by every case);
- merged equals unmerged, and the merged export loads in transformers with the same logits;
- our export loads in `peft.PeftModel.from_pretrained` with the same logits;
- bad input: a target matching nothing, a rank larger than a layer, an adapter of another method or base.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
import torch
import transformers
from flax import nnx
from helpers import GRAD_RTOL, randomize_, to_numpy

from research import peft
from research.config import PeftConfig
from research.models import from_pretrained, save_pretrained
from research.peft.attach import virtual

LOGIT_RTOL = 1e-5

BERT = dict(vocab_size=83, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
            num_labels=3, attn_implementation="eager")
GPT2 = dict(vocab_size=83, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=3, pad_token_id=0,
            bos_token_id=1, eos_token_id=1, attn_implementation="eager")
MODELS = {  # name: (transformers class, config, our task, peft task_type)
    "bert-seq": (transformers.BertForSequenceClassification, transformers.BertConfig(**BERT),
                 "sequence_classification", "SEQ_CLS"),
    "bert-token": (transformers.BertForTokenClassification, transformers.BertConfig(**BERT),
                   "token_classification", "TOKEN_CLS"),
    "gpt2-lm": (transformers.GPT2LMHeadModel, transformers.GPT2Config(**GPT2), "causal_lm", "CAUSAL_LM"),
    "gpt2-seq": (transformers.GPT2ForSequenceClassification, transformers.GPT2Config(**GPT2),
                 "sequence_classification", "SEQ_CLS"),
}
# peft's own way of naming what our family defaults choose (research/models/{bert,gpt2}.py: peft_targets).
PEFT_CONFIGS = {
    ("bert", "lora"): lambda t: torch_peft.LoraConfig(task_type=t, r=4, lora_alpha=8,
                                                     target_modules=["query", "value"]),
    # GPT-2's Conv1D stores (in, out): fan_in_fan_out=True says so (peft would set it itself, with a warning).
    ("gpt2", "lora"): lambda t: torch_peft.LoraConfig(task_type=t, r=4, lora_alpha=8, target_modules=["c_attn"],
                                                     fan_in_fan_out=True),
    ("bert", "adalora"): lambda t: torch_peft.AdaLoraConfig(task_type=t, init_r=6, target_r=2, total_step=10,
                                                           lora_alpha=8, target_modules=["query", "value"]),
    ("gpt2", "adalora"): lambda t: torch_peft.AdaLoraConfig(task_type=t, init_r=6, target_r=2, total_step=10,
                                                           lora_alpha=8, target_modules=["c_attn"],
                                                           fan_in_fan_out=True),
    ("bert", "ia3"): lambda t: torch_peft.IA3Config(
        task_type=t, target_modules=r".*\.(key|value|layer\.\d+\.output\.dense)",
        feedforward_modules=r".*layer\.\d+\.output\.dense"),
    ("gpt2", "ia3"): lambda t: torch_peft.IA3Config(task_type=t, target_modules=["c_attn", "mlp.c_proj"],
                                                   feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
}
OURS = {"lora": PeftConfig(method="lora", rank=4, alpha=8.0), "ia3": PeftConfig(method="ia3"),
        "adalora": PeftConfig(method="adalora", init_rank=6, rank=2, alpha=8.0)}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """Each model's random base weights, saved as transformers saves them."""
    out = {}
    for name, (cls, cfg, _, _) in MODELS.items():
        out[name] = tmp_path_factory.mktemp(name)
        randomize_(cls(cfg), seed=5).save_pretrained(out[name])
    return out


def torch_base(name, base_dirs):
    return MODELS[name][0].from_pretrained(base_dirs[name]).eval()


def batch(name):
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 83, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 6:] = 0  # right padding, as our batches have
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    out_shape = (3, 3) if name.endswith("seq") else (3, 9, 83 if name == "gpt2-lm" else 3)
    weights = rng.normal(size=out_shape).astype(np.float32)  # the loss: a fixed random projection of the logits
    if len(out_shape) == 3:
        weights *= mask[..., None]  # padded positions' logits are not compared
    return ids, mask, weights


def torch_logits(model, ids, mask):
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits


def our_logits(model, ids, mask):
    return model(jnp.asarray(ids), jnp.asarray(mask))


def our_loss_and_grads(model, ids, mask, weights):
    """The loss and its gradient for every trained tensor, under peft's names (our export's naming)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(p):
        return jnp.sum(our_logits(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest)), ids, mask) * weights)

    loss, grads = jax.value_and_grad(loss_of)(params)
    return float(loss), peft.trained_tensors(nnx.merge(graphdef, grads, rest))


def torch_loss_and_grads(model, ids, mask, weights):
    loss = (torch_logits(model, ids, mask) * torch.tensor(weights)).sum()
    loss.backward()
    # peft's in-memory names carry the adapter name ("default") and the modules_to_save wrapper; saved ones do not.
    return float(loss.detach()), {n.replace(".modules_to_save", "").replace(".default", ""): to_numpy(p.grad)
                         for n, p in model.named_parameters() if p.requires_grad}


def assert_close(ours, theirs, rtol, what):
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=rtol * max(scale, 1e-6), err_msg=what)


def assert_grads_equal(ours, theirs):
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name, g in theirs.items():
        assert np.abs(g).max() > 0, f"{name}: zero gradient in torch; the test would prove nothing"
        assert_close(ours[name], g, GRAD_RTOL, name)


def torch_peft_model(name, method, base_dirs, seed=0):
    """peft's model with every trained tensor random (B of LoRA is zero at the start, IA3's ones: random values
    make a wrong scaling, transposition or placement visible)."""
    family = name.split("-")[0]
    model = torch_peft.get_peft_model(torch_base(name, base_dirs), PEFT_CONFIGS[family, method](MODELS[name][3]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_((1.0 if "ia3" in n else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
@pytest.mark.parametrize("name", list(MODELS))
def test_equals_peft_and_loads_its_adapters(name, method, base_dirs, tmp_path):
    theirs = torch_peft_model(name, method, base_dirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = from_pretrained(base_dirs[name], MODELS[name][2])
    peft.prepare(ours, dataclasses.replace(OURS[method], init_from=str(tmp_path / "theirs")), seed=0)
    ids, mask, weights = batch(name)
    expected = to_numpy(torch_logits(theirs, ids, mask)) * (weights != 0)
    assert_close(np.asarray(our_logits(ours, ids, mask)) * (weights != 0), expected, LOGIT_RTOL, "logits")
    loss, grads = our_loss_and_grads(ours, ids, mask, weights)
    their_loss, their_grads = torch_loss_and_grads(theirs, ids, mask, weights)
    np.testing.assert_allclose(loss, their_loss, rtol=1e-5)
    assert_grads_equal(grads, their_grads)


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
@pytest.mark.parametrize("name", ["bert-seq", "gpt2-lm"])
def test_merged_equals_unmerged_and_exports_both_ways(name, method, base_dirs, tmp_path):
    ours = from_pretrained(base_dirs[name], MODELS[name][2])
    peft.prepare(ours, OURS[method], seed=0)
    _randomize_trained(ours, seed=1)
    ids, mask, weights = batch(name)
    keep = weights != 0
    unmerged = np.asarray(our_logits(ours, ids, mask)) * keep

    plain = peft.merged_model(ours)  # a new model, every weight a parameter, no adapters
    assert_close(np.asarray(our_logits(plain, ids, mask)) * keep, unmerged, LOGIT_RTOL, "merged_model")
    peft.merge(ours)  # in place, and back
    assert_close(np.asarray(our_logits(ours, ids, mask)) * keep, unmerged, LOGIT_RTOL, "merge")
    peft.unmerge(ours)
    assert_close(np.asarray(our_logits(ours, ids, mask)) * keep, unmerged, LOGIT_RTOL, "unmerge")

    save_pretrained(plain, tmp_path / "merged")  # transformers alone, no peft
    merged = MODELS[name][0].from_pretrained(tmp_path / "merged").eval()
    assert_close(to_numpy(torch_logits(merged, ids, mask)) * keep, unmerged, LOGIT_RTOL, "merged export")

    peft.save_adapter(ours, OURS[method], tmp_path / "adapter", base_name_or_path=str(base_dirs[name]))
    loaded = torch_peft.PeftModel.from_pretrained(torch_base(name, base_dirs), tmp_path / "adapter").eval()
    assert_close(to_numpy(torch_logits(loaded, ids, mask)) * keep, unmerged, LOGIT_RTOL, "PeftModel")


def _randomize_trained(model, seed):
    state = nnx.state(model, nnx.Param)
    leaves = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    for k, (path, var) in zip(keys, leaves, strict=True):
        base = 1.0 if path[-1] == "scale" and "adapter" in path else 0.0  # IA3's scales sit around 1
        var.set_value(base + 0.2 * jax.random.normal(k, var.get_value().shape))
    nnx.update(model, state)


# -------------------------------------------------------------------------------------------------- AdaLoRA


def test_adalora_orthogonality_penalty_equals_peft(base_dirs, tmp_path):
    # peft adds the regularizer to the loss its forward returns when given labels; our train step adds
    # peft.penalty(model) to the objective's loss. Same total, same gradients.
    theirs = torch_peft_model("bert-seq", "adalora", base_dirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = from_pretrained(base_dirs["bert-seq"], "sequence_classification")
    peft.prepare(ours, dataclasses.replace(OURS["adalora"], init_from=str(tmp_path / "theirs")), seed=0)
    ids, mask, _ = batch("bert-seq")
    labels = np.array([0, 2, 1])
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def loss_of(p):
        model = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))
        log_probs = jax.nn.log_softmax(our_logits(model, ids, mask))
        return -jnp.take_along_axis(log_probs, jnp.asarray(labels)[:, None], 1).mean() + peft.penalty(model)

    loss, grads = jax.value_and_grad(loss_of)(params)
    their_loss = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        labels=torch.tensor(labels)).loss
    their_loss.backward()
    assert float(peft.penalty(ours)) > 0.1 * float(their_loss)  # the penalty is a real part of the loss here
    np.testing.assert_allclose(float(loss), float(their_loss), rtol=1e-5)
    their_grads = {n.replace(".modules_to_save", "").replace(".default", ""): to_numpy(p.grad)
                   for n, p in theirs.named_parameters() if p.requires_grad}
    assert_grads_equal(peft.trained_tensors(nnx.merge(graphdef, grads, rest)), their_grads)


def test_adalora_rank_allocation_equals_peft_rank_allocator(base_dirs, tmp_path):
    """The same parameters and gradients at every step into peft's allocator (update_and_allocate) and ours (the
    optax transformation, its inner optimizer a no-op): the same triplets masked at every step."""
    import optax

    from research.peft.adalora import Schedule, allocator, ranks

    total, tinit, tfinal, delta_t = 12, 2, 3, 2
    config = torch_peft.AdaLoraConfig(task_type="SEQ_CLS", init_r=6, target_r=2, total_step=total, tinit=tinit,
                                      tfinal=tfinal, deltaT=delta_t, target_modules=["query", "value"])
    theirs = torch_peft.get_peft_model(torch_base("bert-seq", base_dirs), config)
    named = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if "lora_" in n}
    assert len(named) == 12  # 4 matrices x (A, E, B)
    ours_params = {n: np.zeros(tuple(p.shape), np.float32) for n, p in named.items()}  # peft's layout, flat names
    # Our allocator finds AdaLoRA's tensors by path: .../adapter/lora_a (D, r), lora_e (r,), lora_b (r, F).
    def our_path(n):
        stem, kind = n.rsplit(".", 1)
        return stem.replace(".", "/") + "/adapter/" + kind.lower()

    def to_ours(n, x):
        return x.reshape(-1) if n.endswith("lora_E") else x.T

    schedule = Schedule(6, 2, 4, total, tinit, tfinal, delta_t, 0.85, 0.85)
    tx = allocator(optax.set_to_zero(), schedule)
    tree = {our_path(n): jnp.asarray(to_ours(n, v)) for n, v in ours_params.items()}
    state = tx.init(tree)
    rng = np.random.RandomState(0)
    history = []
    for step in range(total):
        values = {n: rng.normal(size=p.shape).astype(np.float32) for n, p in named.items()}
        grads = {n: rng.normal(size=p.shape).astype(np.float32) for n, p in named.items()}
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(torch.tensor(values[n]))
                p.grad = torch.tensor(grads[n])
        theirs.base_model.update_and_allocate(step)
        updates, state = tx.update({our_path(n): jnp.asarray(to_ours(n, g)) for n, g in grads.items()}, state,
                                   {our_path(n): jnp.asarray(to_ours(n, v)) for n, v in values.items()})
        for n, p in named.items():
            if n.endswith("lora_E"):
                ours_e = np.asarray(jnp.asarray(to_ours(n, values[n])) + updates[our_path(n)])
                theirs_e = to_numpy(p).reshape(-1)
                np.testing.assert_array_equal(ours_e == 0, theirs_e == 0, err_msg=f"step {step}: {n}")
                np.testing.assert_allclose(ours_e, theirs_e, rtol=1e-6, err_msg=f"step {step}: {n}")
        history.append(sum(ranks(state).values()))
    # The budget: 24 triplets until tinit, falling on the cubic, 8 (target 2 x 4 matrices) from total - tfinal on.
    assert history[0] == 24 and history[-1] == 8 and history == sorted(history, reverse=True)
    assert any(24 > h > 8 for h in history)


# ------------------------------------------------------------------------------------------ bottleneck adapters

ACT = {"houlsby": torch.nn.functional.silu, "pfeiffer": torch.nn.functional.relu}
# Where the adapters sit, in transformers' module names: after the attention's output projection (Houlsby) and
# after the MLP's (both), before the dropout and the residual connection.
SITES = {("bert", "houlsby"): r".*(attention\.output|layer\.\d+\.output)\.dense", ("bert", "pfeiffer"):
         r".*layer\.\d+\.output\.dense", ("gpt2", "houlsby"): r".*(attn|mlp)\.c_proj", ("gpt2", "pfeiffer"):
         r".*mlp\.c_proj"}


class TorchBottleneck(torch.nn.Module):
    """The reference: h + up(act(down(h))) on the output h of the layer it hooks."""

    def __init__(self, tensors, name, activation):
        super().__init__()
        w = {k: torch.tensor(tensors[f"base_model.model.{name}.adapter.{k}"]) for k in
             ("down.weight", "down.bias", "up.weight", "up.bias")}
        self.down = torch.nn.Linear(w["down.weight"].shape[1], w["down.weight"].shape[0])
        self.up = torch.nn.Linear(w["up.weight"].shape[1], w["up.weight"].shape[0])
        with torch.no_grad():
            for k, v in w.items():
                getattr(getattr(self, k.split(".")[0]), k.split(".")[1]).copy_(v)
        self.activation = activation

    def forward(self, h):
        return h + self.up(self.activation(self.down(h)))


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("name", ["bert-seq", "gpt2-lm"])
def test_bottleneck_adapters_equal_the_reference(name, placement, base_dirs):
    import re

    ours = from_pretrained(base_dirs[name], MODELS[name][2])
    peft.prepare(ours, PeftConfig(method="bottleneck", adapter_placement=placement, adapter_size=5), seed=0)
    _randomize_trained(ours, seed=2)
    tensors = peft.trained_tensors(ours)

    theirs = torch_base(name, base_dirs)
    for p in theirs.parameters():
        p.requires_grad_(False)
    hooked = []
    for module_name, module in theirs.named_modules():
        if re.fullmatch(SITES[name.split("-")[0], placement], module_name):
            adapter = TorchBottleneck(tensors, module_name, ACT[placement])
            module.add_module("bottleneck", adapter)  # named like our tensors: <module>.adapter.<part>
            module.register_forward_hook(lambda mod, args, out: mod.bottleneck(out))
            hooked.append(module_name)
    assert hooked == list(peft.describe(ours)["layers"]) and len(hooked) == (4 if placement == "houlsby" else 2)
    head = [n for n, p in theirs.named_parameters() if n.split(".")[0] in ("classifier", "score")]
    for n, p in theirs.named_parameters():
        p.requires_grad_(".bottleneck." in n or n in head)
        if n in head:  # our head was randomized too
            with torch.no_grad():
                p.copy_(torch.tensor(tensors[f"base_model.model.{n}"]))

    ids, mask, weights = batch(name)
    keep = weights != 0
    assert_close(np.asarray(our_logits(ours, ids, mask)) * keep, to_numpy(torch_logits(theirs, ids, mask)) * keep,
                 LOGIT_RTOL, "logits")
    loss, grads = our_loss_and_grads(ours, ids, mask, weights)
    their_loss, their_grads = torch_loss_and_grads(theirs, ids, mask, weights)
    np.testing.assert_allclose(loss, their_loss, rtol=1e-5)
    their_grads = {f"base_model.model.{n.replace('.bottleneck.', '.adapter.')}": g for n, g in their_grads.items()}
    assert_grads_equal(grads, their_grads)


def test_bottleneck_adapters_export_and_load_back_in_our_layout(base_dirs, tmp_path):
    cfg = PeftConfig(method="bottleneck", adapter_placement="houlsby", adapter_size=5)
    ours = from_pretrained(base_dirs["bert-seq"], "sequence_classification")
    peft.prepare(ours, cfg, seed=0)
    _randomize_trained(ours, seed=6)
    peft.save_adapter(ours, cfg, tmp_path / "adapter", base_name_or_path=str(base_dirs["bert-seq"]))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["adapter_size"] == 5 and len(config["target_modules"]) == 4
    again = from_pretrained(base_dirs["bert-seq"], "sequence_classification")
    peft.prepare(again, dataclasses.replace(cfg, init_from=str(tmp_path / "adapter")), seed=1)  # another init
    ids, mask, _ = batch("bert-seq")
    np.testing.assert_array_equal(np.asarray(our_logits(again, ids, mask)), np.asarray(our_logits(ours, ids, mask)))
    with pytest.raises(peft.PeftError, match="cannot be folded into the weights"):
        peft.merged_model(ours)


def test_rslora_scaling_equals_peft(base_dirs, tmp_path):
    theirs = torch_peft.get_peft_model(torch_base("bert-seq", base_dirs), torch_peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours = from_pretrained(base_dirs["bert-seq"], "sequence_classification")
    cfg = PeftConfig(method="lora", rank=4, alpha=8.0, rslora=True, init_from=str(tmp_path / "theirs"))
    peft.prepare(ours, cfg, seed=0)  # scaling alpha / sqrt(r) = 4: init_from checks it against peft's config
    ids, mask, _ = batch("bert-seq")
    assert_close(np.asarray(our_logits(ours, ids, mask)), to_numpy(torch_logits(theirs, ids, mask)), LOGIT_RTOL,
                 "rsLoRA logits")


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_naming_the_culprit(base_dirs, tmp_path):
    def bert():
        return from_pretrained(base_dirs["bert-seq"], "sequence_classification")

    # A pattern that matches nothing fails (peft would pass it silently) and lists the names it could match.
    names = r"bert.encoder.layer.\{i\}.attention.self.key, .*attention.self.query, .*classifier"
    with pytest.raises(peft.PeftError, match=r"peft.targets: 'qurey' matches no layer .* Names: " + names):
        peft.prepare(bert(), PeftConfig(method="lora", targets=("query", "qurey")), seed=0)
    with pytest.raises(peft.PeftError, match=r"peft.modules_to_save: 'clasifier' matches no layer"):
        peft.prepare(bert(), PeftConfig(method="lora", modules_to_save=("clasifier",)), seed=0)
    with pytest.raises(peft.PeftError, match=r"peft.rank=33 exceeds bert.encoder.layer.0.attention.self.query "
                                             r"\(32 -> 32\)"):
        peft.prepare(bert(), PeftConfig(method="lora", rank=33), seed=0)

    # Adapters of another method, another scaling, another model, or no adapter at all.
    torch_peft_model("bert-seq", "ia3", base_dirs).save_pretrained(tmp_path / "ia3")
    with pytest.raises(peft.PeftError, match="holds a IA3 adapter, but this run trains LORA"):
        peft.prepare(bert(), PeftConfig(method="lora", init_from=str(tmp_path / "ia3")), seed=0)
    torch_peft_model("bert-seq", "lora", base_dirs).save_pretrained(tmp_path / "lora")  # r=4, alpha=8
    with pytest.raises(peft.PeftError, match=r"trained with r=4, lora_alpha=8, use_rslora=False \(scaling 2\), this "
                                             r"run scales by 1"):
        peft.prepare(bert(), PeftConfig(method="lora", rank=4, alpha=4.0, init_from=str(tmp_path / "lora")), seed=0)
    torch_peft_model("gpt2-seq", "lora", base_dirs).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(peft.PeftError, match=r"does not fit this model .* Missing: \['base_model.model.bert.encoder"):
        peft.prepare(bert(), PeftConfig(method="lora", rank=4, init_from=str(tmp_path / "gpt2")), seed=0)
    with pytest.raises(peft.PeftError, match="adapter_config.json does not exist"):
        peft.prepare(bert(), PeftConfig(method="lora", init_from=str(tmp_path / "nowhere")), seed=0)

    # Our exports carry the base's fingerprint: loading one onto another base is refused even when it fits.
    ours = bert()
    peft.prepare(ours, OURS["lora"], seed=0)
    peft.save_adapter(ours, OURS["lora"], tmp_path / "ours", base_name_or_path=str(base_dirs["bert-seq"]))
    other = bert()
    kernel = other.bert.layers[0].mlp.output.kernel
    kernel.set_value(kernel.get_value() * 1.01)
    with pytest.raises(peft.PeftError, match="was trained on another base model"):
        peft.prepare(other, dataclasses.replace(OURS["lora"], init_from=str(tmp_path / "ours")), seed=0)


def test_peft_settings_are_checked_with_the_config(data_dir):
    from helpers import smoke

    from research.config import ConfigError

    with pytest.raises(ConfigError, match="peft.\\* options are set but peft.method is 'none'"):
        smoke("peft.rank=4")
    with pytest.raises(ConfigError, match="optim.freeze and peft.method both choose what trains"):
        smoke("peft.method=lora", 'optim.freeze=["bert/embeddings/.*"]')
    with pytest.raises(ConfigError, match="peft.feedforward is IA3's"):
        smoke("peft.method=lora", 'peft.feedforward=["output.dense"]')
    with pytest.raises(ConfigError, match="peft.method='prefx' is not allowed"):
        smoke("peft.method=prefx")


# ------------------------------------------------------------------------------------- prefix and prompt tuning

VIRTUAL = 4


def torch_prompt_learning(name, method, base_dirs, projection=False):
    task_type = MODELS[name][3]
    config = (torch_peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=VIRTUAL,
                                            prefix_projection=projection, encoder_hidden_size=16)
              if method == "prefix" else torch_peft.PromptTuningConfig(task_type=task_type,
                                                                        num_virtual_tokens=VIRTUAL))
    model = torch_peft.get_peft_model(torch_base(name, base_dirs), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_prefix_logits(model, ids, mask):
    """peft's prefix-tuning forward, spelled out with its own pieces (`get_prompt`, the mask extended by P ones)
    for the classification models: transformers 5 renamed their `past_key_values` argument to `cache`, and peft
    0.21's forward, looking for the old name in their signatures, raises. Its causal-LM path works as is."""
    if isinstance(model.base_model, transformers.GPT2LMHeadModel):
        return torch_logits(model, ids, mask)
    cache = model.get_prompt(batch_size=ids.shape[0])
    extended = torch.cat([torch.ones(ids.shape[0], VIRTUAL, dtype=torch.long), torch.tensor(mask)], dim=1)
    return model.base_model(input_ids=torch.tensor(ids), attention_mask=extended, cache=cache).logits


def virtual_outputs(name, method, logits):
    """peft's outputs for the input's own positions: prompt tuning's token-level logits include the virtual ones."""
    if method == "prompt" and logits.ndim == 3:
        return logits[:, VIRTUAL:]
    return logits


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prefix_and_prompt_tuning_equal_peft(name, method, base_dirs, tmp_path):
    theirs = torch_prompt_learning(name, method, base_dirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = from_pretrained(base_dirs[name], MODELS[name][2])
    peft.prepare(ours, PeftConfig(method=method, num_virtual_tokens=VIRTUAL, prefix_projection=False,
                                  init_from=str(tmp_path / "theirs")), seed=0)
    ids, mask, weights = batch(name)
    if name == "gpt2-seq" and method == "prompt":
        # Given embeddings, transformers' GPT-2 classifier reads the last position, padding or not (ours reads the
        # last real token): compare on rows without padding.
        mask[:] = 1
    keep = weights != 0
    forward = torch_prefix_logits if method == "prefix" else torch_logits
    expected = virtual_outputs(name, method, to_numpy(forward(theirs, ids, mask))) * keep
    assert_close(np.asarray(our_logits(ours, ids, mask)) * keep, expected, LOGIT_RTOL, "logits")
    loss, grads = our_loss_and_grads(ours, ids, mask, weights)
    logits = virtual_outputs(name, method, forward(theirs, ids, mask))
    their_loss = (logits * torch.tensor(weights)).sum()
    their_loss.backward()
    their_grads = {n.replace(".modules_to_save", "").replace(".default", "").replace(
        "prompt_encoder.embedding.weight", "prompt_embeddings"): to_numpy(p.grad)
        for n, p in theirs.named_parameters() if p.requires_grad}
    np.testing.assert_allclose(loss, float(their_loss), rtol=1e-5)
    assert_grads_equal(grads, their_grads)

    # And back: our export loads in peft with the same logits.
    peft.save_adapter(ours, PeftConfig(method=method), tmp_path / "ours", base_name_or_path=str(base_dirs[name]))
    loaded = torch_peft.PeftModel.from_pretrained(torch_base(name, base_dirs), tmp_path / "ours").eval()
    assert_close(virtual_outputs(name, method, to_numpy(forward(loaded, ids, mask))) * keep, expected,
                 LOGIT_RTOL, "our export in PeftModel")


@pytest.mark.parametrize("name", ["bert-seq", "gpt2-lm"])
def test_prefix_reparameterization_equals_peft_and_exports_its_output(name, base_dirs, tmp_path):
    theirs = torch_prompt_learning(name, "prefix", base_dirs, projection=True)
    ours = from_pretrained(base_dirs[name], MODELS[name][2])
    peft.prepare(ours, PeftConfig(method="prefix", num_virtual_tokens=VIRTUAL, prefix_hidden_size=16), seed=0)
    prefix = virtual(ours)
    encoder = dict(theirs.named_parameters())
    key = "prompt_encoder.default."
    prefix.embedding.set_value(jnp.asarray(to_numpy(encoder[key + "embedding.weight"])))
    for ours_name, torch_name in (("mlp_in", "transform.0"), ("mlp_out", "transform.2")):
        getattr(prefix, ours_name).kernel.set_value(jnp.asarray(to_numpy(encoder[f"{key}{torch_name}.weight"]).T))
        getattr(prefix, ours_name).bias.set_value(jnp.asarray(to_numpy(encoder[f"{key}{torch_name}.bias"])))
    head = "classifier" if name == "bert-seq" else None
    if head:  # the head is trained too: give ours peft's
        ours.classifier.kernel.set_value(jnp.asarray(to_numpy(encoder[f"base_model.{head}.modules_to_save.default"
                                                                       ".weight"]).T))
        ours.classifier.bias.set_value(jnp.asarray(to_numpy(encoder[f"base_model.{head}.modules_to_save.default"
                                                                     ".bias"])))
    ids, mask, weights = batch(name)
    keep = weights != 0
    expected = to_numpy(torch_prefix_logits(theirs, ids, mask)) * keep
    assert_close(np.asarray(our_logits(ours, ids, mask)) * keep, expected, LOGIT_RTOL, "logits")

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(our_logits(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest)), ids, mask)
                                       * weights))(params)
    (torch_prefix_logits(theirs, ids, mask) * torch.tensor(weights)).sum().backward()
    pairs = {("embedding",): "embedding.weight", ("mlp_in", "kernel"): "transform.0.weight",
             ("mlp_in", "bias"): "transform.0.bias", ("mlp_out", "kernel"): "transform.2.weight",
             ("mlp_out", "bias"): "transform.2.bias"}
    base = grads["bert"] if name == "bert-seq" else grads["transformer"]
    for path, torch_name in pairs.items():
        g = base["prefix"]
        for part in path:
            g = g[part]
        theirs_g = to_numpy(encoder[key + torch_name].grad)
        assert_close(np.asarray(g.get_value()), theirs_g.T if path[-1] == "kernel" else theirs_g, GRAD_RTOL, torch_name)

    # Only the MLP's output is kept: the export loads in peft (a plain table there) with the same logits.
    peft.save_adapter(ours, PeftConfig(method="prefix"), tmp_path / "ours", base_name_or_path=str(base_dirs[name]))
    loaded = torch_peft.PeftModel.from_pretrained(torch_base(name, base_dirs), tmp_path / "ours").eval()
    assert_close(to_numpy(torch_prefix_logits(loaded, ids, mask)) * keep, expected, LOGIT_RTOL,
                 "our export in PeftModel")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generation_with_the_kv_cache_equals_the_full_forward(method, base_dirs):
    from research.generate import generate

    model = from_pretrained(base_dirs["gpt2-lm"], "causal_lm")
    peft.prepare(model, PeftConfig(method=method, num_virtual_tokens=VIRTUAL), seed=0)
    _randomize_trained(model, seed=4)
    prompts = np.array([[0, 0, 5, 9, 13], [7, 3, 8, 2, 11]])  # left-padded, as generate takes them
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = np.asarray(generate(model, prompts, mask, max_new_tokens=6, eos_token_id=None))
    # The same greedy tokens from full forwards without a cache (the path the parity tests check against peft).
    ids, m = prompts, mask
    for _ in range(6):
        logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(m)))
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
        m = np.concatenate([m, np.ones((2, 1), m.dtype)], axis=1)
    np.testing.assert_array_equal(out, ids)
    with pytest.raises(ValueError, match=r"\+ 4 virtual tokens \(PEFT\) exceeds n_positions=32"):
        generate(model, prompts, mask, max_new_tokens=24)


def test_prefix_tuning_packs_two_examples_into_one_row_exactly(base_dirs):
    # The prefix is every example's: two examples packed in one row (each attending to the prefix and itself,
    # positions restarting) give the logits each gives alone in its own padded row.
    model = from_pretrained(base_dirs["bert-seq"], "sequence_classification")
    peft.prepare(model, PeftConfig(method="prefix", num_virtual_tokens=VIRTUAL), seed=0)
    _randomize_trained(model, seed=5)
    a, b = [5, 9, 13, 7], [8, 2, 11]
    padded = np.array([a, b + [0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    alone = np.asarray(model(jnp.asarray(padded), jnp.asarray(mask)))
    packed = jnp.asarray([a + b])
    together = np.asarray(model(packed, jnp.ones_like(packed), position_ids=jnp.asarray([[0, 1, 2, 3, 0, 1, 2]]),
                                segment_ids=jnp.asarray([[1, 1, 1, 1, 2, 2, 2]]),
                                pool_index=jnp.asarray([[0, 0], [0, 4]])))
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_an_adalora_adapter_peft_saved_with_a_rank_pattern_loads_into_its_slots(base_dirs, tmp_path):
    # After its budget phase peft saves only the kept triplets (a rank pattern per matrix, ranks differing).
    theirs = torch_peft_model("bert-seq", "adalora", base_dirs)
    pattern = {}
    with torch.no_grad():
        for i, (n, p) in enumerate((n, p) for n, p in theirs.named_parameters() if "lora_E" in n):
            kept = [k % (i + 2) != 0 for k in range(6)]  # 3, 4, 4, 5 of 6 kept
            p[~torch.tensor(kept)] = 0.0  # what the allocator's masking leaves
            pattern[n.removeprefix("base_model.model.").replace(".default", "")] = kept
    theirs.peft_config["default"].rank_pattern = pattern
    theirs.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == pattern
    ours = from_pretrained(base_dirs["bert-seq"], "sequence_classification")
    peft.prepare(ours, dataclasses.replace(OURS["adalora"], init_from=str(tmp_path / "theirs")), seed=0)
    ids, mask, _ = batch("bert-seq")
    assert_close(np.asarray(our_logits(ours, ids, mask)), to_numpy(torch_logits(theirs, ids, mask)), LOGIT_RTOL,
                 "logits")


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_from_real_words_is_the_kv_cache_of_those_words(projection, base_dirs):
    # Li & Liang's init: for GPT-2, a prefix holding the keys and values of some tokens is exactly having read
    # them: the logits of the input after the prefix equal those after the tokens themselves. Through the MLP
    # too (its output layer is solved to start there).
    from research.peft.attach import real_words
    from research.peft.prefix import Prefix

    model = from_pretrained(base_dirs["gpt2-lm"], "causal_lm")
    words = jnp.asarray([[17, 4, 60, 33]])
    table = real_words(model.transformer, "h", words)
    prefix = Prefix(4, 2, 4, 8, projection, 16, rngs=nnx.Rngs(0))
    prefix.set_table(table)
    np.testing.assert_allclose(np.asarray(prefix.table()), np.asarray(table), atol=1e-5)
    ids = np.array([[5, 9, 13, 7, 21], [8, 2, 11, 3, 30]])
    after_words = np.asarray(model(jnp.concatenate([jnp.repeat(words, 2, axis=0), jnp.asarray(ids)], axis=1)))[:, 4:]
    model.transformer.prefix = prefix
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), after_words, rtol=0,
                               atol=1e-5 * np.abs(after_words).max())
    # Through the config: peft.prefix_init="vocab" builds such a prefix from random vocabulary tokens.
    again = from_pretrained(base_dirs["gpt2-lm"], "causal_lm")
    peft.prepare(again, PeftConfig(method="prefix", num_virtual_tokens=4, prefix_init="vocab",
                                   prefix_projection=projection, prefix_hidden_size=16), seed=0)
    assert np.abs(np.asarray(virtual(again).table())).max() > 0.1
    bert = from_pretrained(base_dirs["bert-seq"], "sequence_classification")  # BERT's layers give theirs too
    peft.prepare(bert, PeftConfig(method="prefix", num_virtual_tokens=4, prefix_init="vocab"), seed=0)
    assert virtual(bert).table().shape == (4, 2 * 2 * 32) and np.abs(np.asarray(virtual(bert).table())).max() > 0.1
