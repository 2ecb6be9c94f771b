"""Post-training quantization through qwix (research/compress/quantize.py): int8's round-trip bound, NF4 against
bitsandbytes' definition (written here), the export that transformers loads and that loads back exactly, and
bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import saved_random_bert

from research.compress import quantize as Q
from research.config import ConfigError
from research.models import from_pretrained
from research.peft import PeftError

# bitsandbytes' NF4 code (functional.py, get_4bit_type("nf4"); QLoRA's appendix E): the 16 values, and the
# quantization that maps each block of 64 consecutive weights of the row-major (out, in) matrix to
# round-to-nearest codes of w / absmax(block).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def bitsandbytes_nf4(weight_out_in: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    blocks = weight_out_in.reshape(-1, block)  # row-major: 64 consecutive inputs of one output row
    absmax = np.abs(blocks).max(1, keepdims=True)
    codes = np.abs(blocks[..., None] / absmax[..., None] - NF4).argmin(-1)
    return codes.reshape(weight_out_in.shape), absmax.reshape(weight_out_in.shape[0], -1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random 2-layer, 128-wide BERT classifier saved by transformers, and ours loaded from it."""
    path = tmp_path_factory.mktemp("bert128")
    return path, saved_random_bert(path, seed=2, hidden_size=128, intermediate_size=256)[1]


IDS = np.random.default_rng(0).integers(1, 83, (3, 11)).astype(np.int32)


def test_int8_weights_round_trip_within_half_a_step_per_channel(pair):
    # Documented bound: each weight within half of its output channel's step. qwix's step is absmax / 127.5
    # (the symmetric bound is int8's max + 0.5, so the largest weight rounds to 127.5 -> 127, still within half).
    _, model = pair
    q = Q.quantize(model, "int8_weights")
    kernels, restored_model = Q.quantized_kernels(q), Q.dequantized(q, model)
    assert len(kernels) == 12  # 6 linear layers x 2 transformer layers; not the pooler, not the classifier
    for path, qarray in kernels.items():
        w, restored = np.asarray(Q._node(model, path)), np.asarray(Q._node(restored_model, path))  # (in, out)
        step = np.abs(w).max(0) / 127.5  # per output channel
        assert (np.abs(restored - w) <= step / 2 + 1e-7).all(), path
        np.testing.assert_allclose(np.asarray(qarray.scale.get_value())[0], step, rtol=1e-6)


def test_nf4_equals_bitsandbytes_definition(pair):
    _, model = pair
    q = Q.quantize(model, "nf4")
    for path, qarray in Q.quantized_kernels(q).items():
        w = np.asarray(Q._node(model, path)).T  # HF's (out, in)
        codes, absmax = bitsandbytes_nf4(w)
        stored = np.asarray(qarray.qvalue.get_value()).T.astype(np.int64)
        np.testing.assert_array_equal(stored, codes, err_msg=str(path))
        np.testing.assert_allclose(np.asarray(qarray.scale.get_value()).T, absmax, rtol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("method", list(Q.METHODS))
def test_export_loads_in_transformers_and_back_exactly(pair, tmp_path, method):
    path, model = pair
    q = Q.quantize(model, method)
    logits = np.asarray(q(jnp.asarray(IDS)))
    about = Q.export_quantized(q, model, tmp_path, method)
    assert about["bytes"] < about["float32_bytes"] and len(about["layers"]) == 12
    assert json.loads((tmp_path / "quantization.json").read_text())["method"] == method
    np.testing.assert_array_equal(np.asarray(Q.load_quantized(tmp_path, "sequence_classification")(jnp.asarray(IDS))),
                                  logits)
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    dequantized = theirs(input_ids=torch.tensor(IDS).long()).logits.detach().numpy()
    if method == "int8":  # transformers computes the activations in float: close, not equal
        np.testing.assert_allclose(dequantized, logits, rtol=0, atol=0.05 * np.abs(logits).max())
    else:  # weight-only: the same numbers in float, up to rounding
        np.testing.assert_allclose(dequantized, logits, rtol=0, atol=1e-5)


def test_quantization_errors(pair, tmp_path):
    _, model = pair
    with pytest.raises(ConfigError, match="quantize targets: 'no_such_layer' matches no layer"):
        Q.quantize(model, "int8", ("no_such_layer",))
    with pytest.raises(ConfigError, match="quantization method 'int3' is not known"):
        Q.quantize(model, "int3")
    with pytest.raises(ConfigError, match="no quantization.json"):
        Q.load_quantized(tmp_path, "sequence_classification")


# ---------------------------------------------------------------------------- quantization-aware training


def test_qat_forward_is_ptqs_and_its_gradient_is_straight_through(pair):
    # Forward: the logits of the PTQ-quantized model, exactly. Backward: the straight-through estimator, i.e.
    # every gradient equals the float model's evaluated at the dequantized weights (1e-5 of each tensor's scale).
    _, model = pair
    qat_model = Q.qat(model, "int8_weights")
    reference = Q.dequantized(Q.quantize(model, "int8_weights"), model)
    np.testing.assert_array_equal(np.asarray(qat_model(jnp.asarray(IDS))),
                                  np.asarray(Q.quantize(model, "int8_weights")(jnp.asarray(IDS))))

    def grads(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        loss = lambda p: jax.nn.log_softmax(nnx.merge(graphdef, p, rest)(jnp.asarray(IDS)))[:, 0].sum()  # noqa: E731
        return dict(nnx.to_flat_state(jax.grad(loss)(params)))

    ours, ref = grads(qat_model), grads(reference)
    assert set(ours) == set(ref)
    overall = max(float(np.abs(np.asarray(g[...])).max()) for g in ref.values())
    for path, g in ref.items():
        g, o = np.asarray(g[...]), np.asarray(ours[path][...])
        np.testing.assert_allclose(o, g, rtol=0, atol=1e-5 * max(float(np.abs(g).max()), 1e-3 * overall),
                                   err_msg=str(path))


def test_qat_run_evaluates_quantized_and_exports_the_quantized_model(tmp_path):
    from helpers import records, smoke

    from research.run import export_run, load_trained_model
    from research.train import train

    cfg = smoke("qat.method=int8_weights", "train.max_steps=8", "train.eval_every=8", "checkpoint.every_steps=8")
    train(cfg, tmp_path / "qat")
    model, _, _ = load_trained_model(tmp_path / "qat", "latest")  # quantization-aware: computes quantized
    float_model, _, _ = load_trained_model(tmp_path / "qat", "latest", quantization_aware=False)
    ids = jnp.asarray(np.random.default_rng(1).integers(1000, 3000, (2, 9)), jnp.int32)
    logits = np.asarray(model(ids))
    np.testing.assert_array_equal(logits, np.asarray(Q.quantize(float_model, "int8_weights")(ids)))
    assert not np.array_equal(logits, np.asarray(float_model(ids)))  # the quantization is really there
    assert "dev/accuracy" in records(tmp_path / "qat")[-1]
    export_run(tmp_path / "qat", tmp_path / "export", "latest")
    np.testing.assert_array_equal(np.asarray(Q.load_quantized(tmp_path / "export", "sequence_classification")(ids)),
                                  logits)
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    np.testing.assert_allclose(theirs(input_ids=torch.tensor(np.asarray(ids)).long()).logits.detach().numpy(), logits,
                               rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="qat.method with peft.method"):
        smoke("qat.method=int8", "peft.method=lora")


def test_research_quantize_evaluates_and_exports_a_run(tmp_path, capsys):
    from helpers import smoke

    from research.cli import main
    from research.train import train

    train(smoke("train.max_steps=4", "train.eval_every=4", "checkpoint.every_steps=4"), tmp_path / "run")
    main(["quantize", str(tmp_path / "run"), str(tmp_path / "int8"), "--method", "int8", "--checkpoint", "latest"])
    printed = capsys.readouterr().out
    assert "int8 quantization of the latest checkpoint (step 4)" in printed and "float32: accuracy" in printed
    about = json.loads((tmp_path / "int8" / "quantization.json").read_text())
    assert set(about["dev"]) == {"float32", "int8"} and about["step"] == 4
    assert 0 <= about["dev"]["int8"]["dev/accuracy"] <= 1 and about["bytes"] < about["float32_bytes"]
    transformers.BertForSequenceClassification.from_pretrained(tmp_path / "int8")  # loads, no missing weights


# ------------------------------------------------------------------------------------------------- QLoRA


def test_qlora_is_lora_over_the_nf4_dequantized_base(pair):
    # Ours: LoRA attached, then the frozen base of every block's linear layers in NF4 (codes equal to the PTQ
    # NF4 ones, which equal bitsandbytes'). Reference: the same LoRA over a base whose kernels are the NF4-
    # dequantized values in float. Logits 1e-6, every trained gradient 1e-5 of its scale.
    from research import peft
    from research.config import PeftConfig
    from research.peft.attach import adapters

    path, _ = pair
    qlora = peft.prepare(from_pretrained(path, "sequence_classification"),
                         PeftConfig(method="lora", base_quantization="nf4"), seed=0)
    reference = peft.prepare(Q.dequantized(Q.quantize(from_pretrained(path, "sequence_classification"), "nf4"),
                                           from_pretrained(path, "sequence_classification")),
                             PeftConfig(method="lora"), seed=0)
    ptq = Q.quantized_kernels(Q.quantize(from_pretrained(path, "sequence_classification"), "nf4"))
    query = qlora.bert.layers[1].attention.query.kernel.get_value()
    expected = ptq[("bert", "layers", 1, "attention", "query", "kernel")].qvalue.get_value()
    np.testing.assert_array_equal(np.asarray(query.qvalue), np.asarray(expected))
    for m in (qlora, reference):  # B away from zero, the same in both, so the update counts
        rng = np.random.default_rng(0)
        for _, adapter in adapters(m).values():
            b = adapter.lora.lora_b
            b.set_value(jnp.asarray(rng.normal(0, 0.05, b.get_value().shape), jnp.float32))

    def run(m):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)
        f = lambda p: nnx.merge(graphdef, p, rest)(jnp.asarray(IDS))  # noqa: E731
        loss = lambda p: jax.nn.log_softmax(f(p))[:, 0].sum()  # noqa: E731
        return np.asarray(f(params)), dict(nnx.to_flat_state(jax.grad(loss)(params)))

    (ours, g_ours), (theirs, g_ref) = run(qlora), run(reference)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert set(g_ours) == set(g_ref) and any("lora" in str(p) for p in g_ours)
    for p, g in g_ref.items():
        g = np.asarray(g[...])
        np.testing.assert_allclose(np.asarray(g_ours[p][...]), g, rtol=0, atol=1e-5 * np.abs(g).max(), err_msg=str(p))


def test_qlora_run_exports_merged_into_the_dequantized_weights(tmp_path):
    from helpers import smoke

    from research.run import export_run, load_trained_model
    from research.train import train

    wide = ('model.overrides={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, '
            '"intermediate_size": 128}')
    cfg = smoke(wide, "peft.method=lora", "peft.base_quantization=nf4", "train.max_steps=4", "train.eval_every=4",
                "checkpoint.every_steps=4")
    train(cfg, tmp_path / "qlora")
    message = export_run(tmp_path / "qlora", tmp_path / "merged", "latest", merged=True)
    gap = float(message.split("dev examples: ")[1].rstrip(")"))
    assert gap < 1e-4, message  # the merged model computes what the QLoRA model computes
    model, _, _ = load_trained_model(tmp_path / "qlora", "latest")
    ids = jnp.asarray(np.random.default_rng(2).integers(1000, 3000, (2, 9)), jnp.int32)
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(theirs(input_ids=torch.tensor(np.asarray(ids)).long()).logits.detach().numpy(),
                               np.asarray(model(ids)), rtol=0, atol=1e-4)
    with pytest.raises(PeftError, match="not a multiple of the NF4 block of 64"):
        train(smoke("peft.method=lora", "peft.base_quantization=nf4", "train.max_steps=1"), tmp_path / "narrow")
    with pytest.raises(ConfigError, match="is QLoRA"):
        smoke("peft.method=ia3", "peft.base_quantization=nf4")


def test_gpt2_quantizes_and_exports(tiny_gpt2_dir, tmp_path):
    # GPT-2's block linears (c_attn, c_proj, c_fc, mlp.c_proj) quantized; the tied LM head stays float. The
    # export loads in transformers (weight-only: the same logits) and back here exactly.
    model = from_pretrained(tiny_gpt2_dir, "causal_lm")
    q = Q.quantize(model, "int8_weights")
    assert len(Q.quantized_kernels(q)) == 8  # 4 per block, 2 blocks
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50000, (2, 9)), jnp.int32)
    logits = np.asarray(q(ids))
    assert np.abs(logits - np.asarray(model(ids))).max() > 0
    Q.export_quantized(q, model, tmp_path, "int8_weights")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(theirs(input_ids=torch.tensor(np.asarray(ids)).long()).logits.detach().numpy(), logits,
                               rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(Q.load_quantized(tmp_path, "causal_lm")(ids)), logits)
