"""Structured pruning (research/compress/structured.py, the configs' pruned_heads / pruned_neurons): Michel et
al.'s importance of heads and MLP neurons against a PyTorch reference, the compact model equal to the gated full
one, the zero-padded export that transformers loads and ours reads back compact, the choice of units, and
`research prune`; on BERT sequence classifiers and GPT-2 causal LMs (with KV-cache decoding)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import saved_random_bert, smoke

from research import peft
from research.compress import structured
from research.config import ConfigError, PeftConfig
from research.data.split import Split, SplitReport
from research.models import from_pretrained, save_pretrained
from research.models.bert import BertConfig
from research.peft.targets import PeftError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    return (*saved_random_bert(path, seed=4, hidden_size=32, intermediate_size=40), path)


def split_of(n=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 83, int(rng.integers(3, 12))).astype(np.int32) for _ in range(n)]
    return Split("train", ids, [np.zeros_like(x) for x in ids], rng.integers(0, 3, n).astype(np.int32),
                 [""] * n, SplitReport("train", "test"))


def test_importance_equals_pytorch(pair):
    # Reference: a gate on each head's context (a pre-hook on the attention's output projection) and on each MLP
    # activation (a pre-hook on the MLP's output projection), the absolute gradient per example, averaged, then
    # each layer divided by its l2 norm. 1e-4 relative.
    theirs, ours, _ = pair
    split = split_of()
    head_gates = [torch.ones(4, requires_grad=True) for _ in range(2)]
    neuron_gates = [torch.ones(40, requires_grad=True) for _ in range(2)]

    def gate_heads(layer):
        def hook(module, args):
            x = args[0]
            return (x.view(*x.shape[:2], 4, 8) * head_gates[layer][:, None]).view(*x.shape),
        return hook

    def gate_neurons(layer):
        return lambda module, args: (args[0] * neuron_gates[layer],)

    encoder = theirs.bert.encoder.layer
    hooks = [encoder[i].attention.output.dense.register_forward_pre_hook(gate_heads(i)) for i in (0, 1)]
    hooks += [encoder[i].output.dense.register_forward_pre_hook(gate_neurons(i)) for i in (0, 1)]
    gates = head_gates + neuron_gates
    total = [torch.zeros_like(g) for g in gates]
    for i in range(len(split)):
        logits = theirs(input_ids=torch.tensor(split.input_ids[i])[None].long()).logits
        grads = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([int(split.labels[i])])), gates)
        total = [t + g.abs() for t, g in zip(total, grads, strict=True)]
    for h in hooks:
        h.remove()
    expected = [(t / len(split)) / (t / len(split)).norm() for t in total]
    got_heads, got_neurons = structured.importance(ours, split, examples=len(split), pad_id=0, batch_size=4)
    for g, e in zip([*got_heads, *got_neurons], expected, strict=True):  # 3 batches, the last with fillers
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-4)


def test_pruned_model_equals_the_gated_one_and_exports_with_zeros(pair, tmp_path):
    theirs, ours, _ = pair
    heads, neurons = {0: [1, 3], 1: [2]}, {0: list(range(0, 40, 3)), 1: [5, 6]}
    small = structured.prune(ours, heads, neurons)
    assert [layer.attention.num_heads for layer in small.bert.layers] == [2, 3]
    assert small.bert.layers[0].attention.query.kernel.get_value().shape == (32, 16)  # 2 heads of 8
    assert small.bert.layers[0].mlp.intermediate.kernel.get_value().shape == (32, 26)  # 40 - 14 neurons
    assert small.bert.layers[1].mlp.output.kernel.get_value().shape == (38, 32)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 83, (3, 10)), jnp.int32)
    head_gates, neuron_gates = structured.gates_for(ours.config, heads, neurons)
    gated = ours.head(ours.cls(ours.bert(ids, head_gates=head_gates, neuron_gates=neuron_gates)))
    np.testing.assert_allclose(np.asarray(small(ids)), np.asarray(gated), rtol=0, atol=1e-5)
    save_pretrained(small, tmp_path)
    exported = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    layer0 = exported.bert.encoder.layer[0]
    value = layer0.attention.self.value.weight.detach().numpy()
    assert not value[8:16].any() and not value[24:32].any() and value[:8].any()  # heads 1 and 3: zeros
    assert not layer0.output.dense.weight.detach().numpy()[:, ::3].any()  # neurons 0, 3, ...: zero columns
    np.testing.assert_allclose(exported(input_ids=torch.tensor(np.asarray(ids)).long()).logits.detach().numpy(),
                               np.asarray(gated), rtol=0, atol=1e-5)
    back = from_pretrained(tmp_path, "sequence_classification")
    assert dict(back.config.pruned_heads) == {0: (1, 3), 1: (2,)}
    assert dict(back.config.pruned_neurons)[1] == (5, 6)
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(small(ids)))
    # Pruning again counts in original indices, on top of what is gone.
    smaller = structured.prune(small, {0: [0]})
    assert dict(smaller.config.pruned_heads) == {0: (0, 1, 3), 1: (2,)}
    assert smaller.config.pruned_neurons == small.config.pruned_neurons


def test_the_least_important_heads_go_never_a_layers_last():
    importance = [np.array([0.9, 0.1, 0.2]), np.array([0.05, 0.01, 0.8])]
    assert structured.units_to_prune(importance, 0.5) == {0: [1], 1: [0, 1]}
    assert structured.units_to_prune([np.array([0.1, 0.2]), np.array([0.3])], 0.6) == {0: [0]}  # layer 1: its last
    # A layer that lost heads before: importance covers the remaining ones, the answer is in original indices.
    assert structured.units_to_prune([np.array([0.5, 0.1])], 0.5, {0: (0, 1)}) == {0: [3]}
    with pytest.raises(ConfigError, match="fraction=1.0"):
        structured.units_to_prune(importance, 1.0)
    with pytest.raises(ValueError, match="would keep no head or neuron"):
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, pruned_heads={"0": [0, 1]})


def test_research_prune(tmp_path, capsys):
    from research.cli import main
    from research.train import train

    train(smoke("train.max_steps=4", "train.eval_every=4", "checkpoint.every_steps=4"), tmp_path / "run")
    main(["prune", str(tmp_path / "run"), str(tmp_path / "half"), "--heads", "0.5", "--neurons", "0.25",
          "--examples", "64", "--checkpoint", "latest"])
    assert "pruned 1 of 2 heads and 16 of 64 MLP neurons" in capsys.readouterr().out
    about = json.loads((tmp_path / "half" / "pruning.json").read_text())
    assert about["heads_after"] == 1 and about["neurons_after"] == 48 and set(about["dev"]) == {"before", "after"}
    model = from_pretrained(tmp_path / "half", "sequence_classification")
    assert sum(layer.attention.num_heads for layer in model.bert.layers) == 1


# ---------------------------------------------------------------------------------------------------- GPT-2


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """A tiny random GPT-2 LM in transformers (4 heads of 8, 40 MLP neurons, eval mode) and ours loaded from it."""
    from helpers import randomize_

    path = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(vocab_size=83, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=40,
                                  attn_implementation="eager")
    theirs = randomize_(transformers.GPT2LMHeadModel(cfg), seed=5)
    theirs.save_pretrained(path)
    return theirs, from_pretrained(path, "causal_lm")


def lm_split_of(n=10, seed=0):
    """A causal-LM split: each example's targets are its next tokens (none after the last)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 83, int(rng.integers(3, 12))).astype(np.int32) for _ in range(n)]
    targets = [np.concatenate([x[1:], [-1]]).astype(np.int32) for x in ids]
    return Split("train", ids, None, np.full(n, -1, np.int32), [""] * n, SplitReport("train", "test"),
                 token_targets=targets)


def test_gpt2_importance_equals_pytorch(gpt2_pair):
    # As for BERT, the gates sit on each head's context (a pre-hook on attn.c_proj) and each MLP activation (a
    # pre-hook on mlp.c_proj); each example's loss is its mean next-token cross-entropy. 1e-4 relative.
    theirs, ours = gpt2_pair
    split = lm_split_of()
    head_gates = [torch.ones(4, requires_grad=True) for _ in range(2)]
    neuron_gates = [torch.ones(40, requires_grad=True) for _ in range(2)]

    def gate_heads(layer):
        def hook(module, args):
            x = args[0]
            return (x.view(*x.shape[:2], 4, 8) * head_gates[layer][:, None]).view(*x.shape),
        return hook

    hooks = [theirs.transformer.h[i].attn.c_proj.register_forward_pre_hook(gate_heads(i)) for i in (0, 1)]
    hooks += [theirs.transformer.h[i].mlp.c_proj.register_forward_pre_hook(
        lambda module, args, i=i: (args[0] * neuron_gates[i],)) for i in (0, 1)]
    gates = head_gates + neuron_gates
    total = [torch.zeros_like(g) for g in gates]
    for ids in split.input_ids:
        ids_t = torch.tensor(ids)[None].long()
        logits = theirs(input_ids=ids_t).logits
        loss = F.cross_entropy(logits[0, :-1], ids_t[0, 1:])
        total = [t + g.abs() for t, g in zip(total, torch.autograd.grad(loss, gates), strict=True)]
    for h in hooks:
        h.remove()
    expected = [(t / len(split)) / (t / len(split)).norm() for t in total]
    got_heads, got_neurons = structured.importance(ours, split, examples=len(split), pad_id=0, batch_size=4)
    for g, e in zip([*got_heads, *got_neurons], expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-4)


def test_gpt2_pruned_lm_equals_the_gated_one_decodes_and_exports_with_zeros(gpt2_pair, tmp_path):
    from research.models.gpt2 import KVCache

    theirs, ours = gpt2_pair
    heads, neurons = {0: [1, 3], 1: [2]}, {0: list(range(0, 40, 3)), 1: [5, 6]}
    small = structured.prune(ours, heads, neurons, task="causal_lm")
    attn0 = small.transformer.h[0].attn
    assert [block.attn.num_heads for block in small.transformer.h] == [2, 3]
    assert attn0.c_attn.kernel.get_value().shape == (32, 48)  # q, k, v of 2 heads of 8
    assert attn0.c_proj.kernel.get_value().shape == (16, 32)
    assert small.transformer.h[0].mlp.c_fc.kernel.get_value().shape == (32, 26)  # 40 - 14 neurons
    assert structured.unit_counts(small.config) == (5, 26 + 38)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 83, (3, 10)), jnp.int32)
    head_gates, neuron_gates = structured.gates_for(ours.config, heads, neurons)
    gated = ours.transformer.wte.attend(ours.transformer(ids, head_gates=head_gates, neuron_gates=neuron_gates))
    np.testing.assert_allclose(np.asarray(small(ids)), np.asarray(gated), rtol=0, atol=1e-5)
    # Decoding with the KV cache: each layer's cache holds the heads it keeps.
    cache = KVCache.create(small.config, 3, 10)
    assert [k.shape[1] for k in cache.keys] == [2, 3]
    cached, _ = small(ids[:, :6], position_ids=jnp.broadcast_to(jnp.arange(6), (3, 6)), cache=cache)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(small(ids[:, :6])), rtol=0, atol=1e-5)
    # The export: zeros at full shape, which transformers computes with; ours reads it back compact.
    save_pretrained(small, tmp_path)
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    c_attn = exported.transformer.h[0].attn.c_attn.weight.detach().numpy()  # (D, 3D), q | k | v
    for third in range(3):
        assert not c_attn[:, third * 32 + 8 : third * 32 + 16].any() and c_attn[:, third * 32 : third * 32 + 8].any()
    assert not exported.transformer.h[0].mlp.c_proj.weight.detach().numpy()[::3].any()  # pruned neurons: zero rows
    with torch.no_grad():
        logits = exported(input_ids=torch.tensor(np.asarray(ids)).long()).logits.numpy()
    np.testing.assert_allclose(logits, np.asarray(gated), rtol=0, atol=1e-5)
    back = from_pretrained(tmp_path, "causal_lm")
    assert dict(back.config.pruned_heads) == {0: (1, 3), 1: (2,)}
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(small(ids)))
    with pytest.raises(ConfigError, match="BERT sequence classifiers and GPT-2 causal LMs"):
        structured.prune(from_pretrained(tmp_path, "sequence_classification"), {0: [0]})
    with pytest.raises(PeftError, match="prefix tuning on a model with pruned attention heads"):
        peft.prepare(back, PeftConfig(method="prefix"), seed=0)
