"""BERT parity against transformers (PyTorch, eager attention), float32 at "highest" matmul precision.

Per layer (embeddings, one attention block, one MLP), then the full model: every hidden state and the logits
of every head, on several small random configs with padding, a fully padded row and token types.
Tolerance: 1e-5 absolute for small configs, 1e-4 at the full bert-base-uncased config.
"""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import randomize_, to_numpy

from research.models import from_pretrained
from research.models.bert import BertConfig

ATOL_SMALL = 1e-5
ATOL_FULL = 1e-4

SMALL_CONFIGS = {
    "tiny": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 type_vocab_size=3, max_position_embeddings=64),
    "wide-heads": dict(vocab_size=211, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                       intermediate_size=96, max_position_embeddings=40),
    "relu-deep": dict(vocab_size=57, hidden_size=24, num_hidden_layers=4, num_attention_heads=6, intermediate_size=50,
                      hidden_act="relu", layer_norm_eps=1e-5, max_position_embeddings=32),
}

HF_CLASSES = {
    "base": transformers.BertModel,
    "sequence_classification": transformers.BertForSequenceClassification,
    "token_classification": transformers.BertForTokenClassification,
    "masked_lm": transformers.BertForMaskedLM,
}


def make_batch(vocab_size, type_vocab_size, seed=0, B=4, T=11):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 7:] = 0  # right padding
    mask[2, 3:] = 0
    mask[3, :] = 0  # a fully padded row: must not give NaN
    ids[mask == 0] = 0
    types = rng.integers(0, type_vocab_size, (B, T))
    return ids, mask, types


def torch_and_ours(tmp_path, task, seed=0, std=0.05, **cfg):
    hf_cfg = transformers.BertConfig(**cfg, num_labels=5, attn_implementation="eager")
    torch_model = randomize_(HF_CLASSES[task](hf_cfg), seed, std)
    torch_model.save_pretrained(tmp_path / task)
    return torch_model, from_pretrained(tmp_path / task, task)


def assert_hidden_states_equal(ours, theirs, atol):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        np.testing.assert_allclose(np.asarray(a), to_numpy(b), atol=atol, rtol=0, err_msg=f"hidden state {i}")


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_layers_match(tmp_path, name):
    cfg = SMALL_CONFIGS[name]
    theirs, ours = torch_and_ours(tmp_path, "base", **cfg)
    ids, mask, types = make_batch(cfg["vocab_size"], cfg.get("type_vocab_size", 2))

    # Capture what each transformers sub-module sees and returns during a full forward pass.
    seen = {}
    layer = theirs.encoder.layer[1]
    hooks = [
        theirs.embeddings.register_forward_hook(lambda m, a, k, out: seen.update(emb=out), with_kwargs=True),
        layer.attention.register_forward_hook(
            lambda m, a, k, out: seen.update(attn_in=k.get("hidden_states", a[0] if a else None), attn_out=out[0]),
            with_kwargs=True),
        layer.intermediate.register_forward_hook(lambda m, a, out: seen.update(mlp_in=a[0])),
        layer.output.register_forward_hook(lambda m, a, out: seen.update(mlp_out=out)),
    ]
    with torch.no_grad():
        theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    for h in hooks:
        h.remove()

    T = ids.shape[1]
    emb = ours.embeddings(ours.embed(jnp.asarray(ids)), jnp.asarray(types), jnp.broadcast_to(jnp.arange(T), ids.shape))
    np.testing.assert_allclose(np.asarray(emb), to_numpy(seen["emb"]), atol=ATOL_SMALL, rtol=0)

    mask_b11s = jnp.asarray(mask, bool)[:, None, None, :]
    attn = ours.layers[1].attention(jnp.asarray(to_numpy(seen["attn_in"])), mask_b11s)
    np.testing.assert_allclose(np.asarray(attn), to_numpy(seen["attn_out"]), atol=ATOL_SMALL, rtol=0)

    mlp = ours.layers[1].mlp(jnp.asarray(to_numpy(seen["mlp_in"])))
    np.testing.assert_allclose(np.asarray(mlp), to_numpy(seen["mlp_out"]), atol=ATOL_SMALL, rtol=0)


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
@pytest.mark.parametrize("task", sorted(HF_CLASSES))
def test_full_model_matches(tmp_path, name, task):
    cfg = SMALL_CONFIGS[name]
    theirs, ours = torch_and_ours(tmp_path, task, seed=zlib.crc32(name.encode()) % 1000, **cfg)
    ids, mask, types = make_batch(cfg["vocab_size"], cfg.get("type_vocab_size", 2), seed=1)

    with torch.no_grad():
        out = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types), output_hidden_states=True)
    logits = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    assert np.isfinite(np.asarray(logits)).all()

    base = ours if task == "base" else ours.bert
    _, hidden = base(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types), output_hidden_states=True)
    assert_hidden_states_equal(hidden, out.hidden_states, ATOL_SMALL)
    expected = out.last_hidden_state if task == "base" else out.logits
    np.testing.assert_allclose(np.asarray(logits), to_numpy(expected), atol=ATOL_SMALL, rtol=0)
    if task == "base":
        np.testing.assert_allclose(np.asarray(ours.pool(logits)), to_numpy(out.pooler_output), atol=ATOL_SMALL)


def test_inputs_embeds_equals_input_ids(tmp_path):
    cfg = SMALL_CONFIGS["tiny"]
    _, ours = torch_and_ours(tmp_path, "sequence_classification", **cfg)
    ids, mask, types = make_batch(cfg["vocab_size"], cfg["type_vocab_size"])
    a = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    b = ours(attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types),
             inputs_embeds=ours.embed(jnp.asarray(ids)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_full_bert_base_config(tmp_path):
    """bert-base-uncased shapes (12 x 768, vocab 30522) with random weights, 1e-4 absolute."""
    cfg = {k: v for k, v in vars(BertConfig()).items() if k not in ("dtype", "num_labels", "id2label")}
    theirs, ours = torch_and_ours(tmp_path, "sequence_classification", std=0.02, **cfg)
    ids, mask, types = make_batch(cfg["vocab_size"], 2, B=4, T=32)
    with torch.no_grad():
        out = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types), output_hidden_states=True)
    _, hidden = ours.bert(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types), output_hidden_states=True)
    assert_hidden_states_equal(hidden, out.hidden_states, ATOL_FULL)
    logits = ours(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(logits), to_numpy(out.logits), atol=ATOL_FULL, rtol=0)


def test_real_minilm_hidden_states(minilm_dir):
    """The real all-MiniLM-L6-v2 weights, tokenized by the checkpoint's tokenizer: 1e-5 absolute."""
    from research.models import load_tokenizer

    tok = load_tokenizer(minilm_dir)
    tok.enable_padding(pad_id=0)
    sentences = ["The movie was a delight from start to finish.", "Terrible.", "An unremarkable, forgettable film."]
    enc = tok.encode_batch(sentences)
    ids, mask = np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc])

    theirs = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    ours = from_pretrained(minilm_dir, "base")
    inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    with torch.no_grad():
        out = theirs(**inputs)
        exact = theirs.double()(**inputs)  # float64 reference to judge float32 rounding
    last, hidden = ours(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    real = mask.astype(bool)
    for i, (a, b, c) in enumerate(zip(hidden, out.hidden_states, exact.hidden_states, strict=True)):
        a, b, c = np.asarray(a), to_numpy(b), to_numpy(c)
        # Real tokens: 1e-5 absolute (hidden values reach ~10 in this model).
        np.testing.assert_allclose(a[real], b[real], atol=ATOL_SMALL, rtol=0, err_msg=f"hidden state {i}")
        # Padding positions (queries that only see real keys) are worse conditioned in float32: there we
        # require our error against float64 to be no worse than PyTorch float32's own (measured ~2.6e-5).
        ours_err, torch_err = np.abs(a - c).max(), np.abs(b - c).max()
        assert ours_err <= 1.5 * torch_err + 1e-6, f"hidden state {i}: {ours_err} vs torch fp32 {torch_err}"
    np.testing.assert_allclose(np.asarray(ours.pool(last)), to_numpy(out.pooler_output), atol=ATOL_SMALL)
