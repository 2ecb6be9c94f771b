"""GPT-2 parity against transformers (PyTorch, eager attention), float32 at "highest" matmul precision.

Per layer (embeddings, one attention block, one MLP) and full model (every hidden state, LM and
classification logits) on several small random configs with left- and right-padded batches; the full
124M `gpt2` config; then generation: the KV-cache path equals the no-cache path, and greedy `generate`
equals transformers' `generate` token for token.
Tolerance: 1e-5 absolute for small configs, 1e-4 at the full config.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import randomize_, to_numpy

from research.generate import generate
from research.models import from_pretrained
from research.models.gpt2 import KVCache, positions_from_mask

ATOL_SMALL = 1e-5
ATOL_FULL = 1e-4

SMALL_CONFIGS = {
    "tiny": dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "wide-heads": dict(vocab_size=257, n_positions=48, n_embd=48, n_layer=3, n_head=3, n_inner=100),
    "inverse-layer-scale": dict(vocab_size=67, n_positions=40, n_embd=24, n_layer=4, n_head=6,
                                scale_attn_by_inverse_layer_idx=True, activation_function="gelu"),
}

HF_CLASSES = {
    "base": transformers.GPT2Model,
    "causal_lm": transformers.GPT2LMHeadModel,
    "sequence_classification": transformers.GPT2ForSequenceClassification,
}

PAD = 0


def make_batch(vocab_size, seed=0, B=4, T=12, left=True):
    """Rows of different lengths padded on the left (or right) with PAD; position ids counting real tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, (B, T))
    lengths = [T, T - 3, 5, 1][:B]
    mask = np.zeros((B, T), np.int64)
    for i, n in enumerate(lengths):
        if left:
            mask[i, T - n:] = 1
        else:
            mask[i, :n] = 1
    ids[mask == 0] = PAD
    return ids, mask, np.asarray(positions_from_mask(jnp.asarray(mask)))


def torch_and_ours(tmp_path, task, seed=0, std=0.05, **cfg):
    hf_cfg = transformers.GPT2Config(**cfg, num_labels=3, pad_token_id=PAD, attn_implementation="eager",
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch_model = randomize_(HF_CLASSES[task](hf_cfg), seed, std)
    torch_model.save_pretrained(tmp_path / task)
    return torch_model, from_pretrained(tmp_path / task, task)


def forward_torch(model, ids, mask, pos, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos), output_hidden_states=True, **kw)


def assert_hidden_states_equal(ours, theirs, atol):
    """Every position, padding included (a left-padding query sees no key and attends uniformly in both)."""
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        np.testing.assert_allclose(np.asarray(a), to_numpy(b), atol=atol, rtol=0,
                                   err_msg=f"hidden state {i}")


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_layers_match(tmp_path, name):
    cfg = SMALL_CONFIGS[name]
    theirs, ours = torch_and_ours(tmp_path, "base", **cfg)
    ids, mask, pos = make_batch(cfg["vocab_size"])
    seen = {}
    block = theirs.h[1]
    hooks = [
        block.register_forward_hook(lambda m, a, k, out: seen.update(block_in=a[0] if a else k["hidden_states"]),
                                    with_kwargs=True),
        block.attn.register_forward_hook(
            lambda m, a, k, out: seen.update(attn_in=a[0] if a else k["hidden_states"], attn_out=out[0]),
            with_kwargs=True),
        block.mlp.register_forward_hook(lambda m, a, out: seen.update(mlp_in=a[0], mlp_out=out)),
    ]
    out = forward_torch(theirs, ids, mask, pos)
    for h in hooks:
        h.remove()
    real = mask.astype(bool)

    emb = ours.wte(jnp.asarray(ids)) + ours.wpe(jnp.asarray(pos))
    np.testing.assert_allclose(np.asarray(emb), to_numpy(out.hidden_states[0]), atol=ATOL_SMALL, rtol=0)

    T = ids.shape[1]
    mask_b1ts = jnp.tril(jnp.ones((T, T), bool))[None, None] & jnp.asarray(real)[:, None, None, :]
    attn, _ = ours.h[1].attn(jnp.asarray(to_numpy(seen["attn_in"])), mask_b1ts)
    np.testing.assert_allclose(np.asarray(attn), to_numpy(seen["attn_out"]), atol=ATOL_SMALL, rtol=0)

    mlp = ours.h[1].mlp(jnp.asarray(to_numpy(seen["mlp_in"])))
    np.testing.assert_allclose(np.asarray(mlp), to_numpy(seen["mlp_out"]), atol=ATOL_SMALL, rtol=0)


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
@pytest.mark.parametrize("task", sorted(HF_CLASSES))
def test_full_model_matches(tmp_path, name, task, left):
    cfg = SMALL_CONFIGS[name]
    theirs, ours = torch_and_ours(tmp_path, task, seed=3, **cfg)
    ids, mask, pos = make_batch(cfg["vocab_size"], seed=2, left=left)
    out = forward_torch(theirs, ids, mask, pos)

    base = ours if task == "base" else ours.transformer
    _, hidden = base(jnp.asarray(ids), jnp.asarray(mask), position_ids=jnp.asarray(pos), output_hidden_states=True)
    assert_hidden_states_equal(hidden, out.hidden_states, ATOL_SMALL)

    # Our default positions (counting real tokens) are the ones passed to transformers explicitly above.
    logits = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.isfinite(logits).all()
    expected = to_numpy(out.last_hidden_state if task == "base" else out.logits)
    np.testing.assert_allclose(logits, expected, atol=ATOL_SMALL, rtol=0)


def test_full_gpt2_124m_config(tmp_path):
    """The 124M `gpt2` shapes (12 x 768, vocab 50257, 1024 positions) with random weights, 1e-4 absolute."""
    theirs, ours = torch_and_ours(tmp_path, "causal_lm", seed=5, std=0.02)
    ids, mask, pos = make_batch(50257, T=24)
    out = forward_torch(theirs, ids, mask, pos)
    _, hidden = ours.transformer(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    assert_hidden_states_equal(hidden, out.hidden_states, ATOL_FULL)
    logits = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(logits, to_numpy(out.logits), atol=ATOL_FULL, rtol=0)


# ------------------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def lm_pair(tmp_path_factory):
    cfg = dict(vocab_size=97, n_positions=96, n_embd=32, n_layer=2, n_head=4)
    return torch_and_ours(tmp_path_factory.mktemp("lm"), "causal_lm", seed=11, **cfg)


def test_kv_cache_equals_full_forward(lm_pair):
    """Prefill a left-padded prompt, then feed the rest one token at a time: every logit at a real position
    equals the no-cache forward over the whole sequence."""
    _, ours = lm_pair
    ids, mask, pos = make_batch(97, seed=4, T=16)
    full = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))

    P = 9
    cache = KVCache.create(ours.config, ids.shape[0], 20)
    logits, cache = ours(jnp.asarray(ids[:, :P]), jnp.asarray(mask[:, :P]), position_ids=jnp.asarray(pos[:, :P]),
                         cache=cache)
    steps = [np.asarray(logits)]
    for t in range(P, ids.shape[1]):
        logits, cache = ours(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]),
                             position_ids=jnp.asarray(pos[:, t:t + 1]), cache=cache)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(incremental[real], full[real], atol=ATOL_SMALL, rtol=0)
    assert int(cache.index) == ids.shape[1]


def test_greedy_generate_matches_transformers(lm_pair):
    """32 new tokens, batch of 3 left-padded prompts, no early stop: token for token identical."""
    theirs, ours = lm_pair
    ids = np.array([[0, 0, 0, 5, 17, 42, 8], [0, 23, 9, 64, 2, 71, 30], [11, 12, 13, 14, 15, 16, 17]])
    mask = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32,
                                   min_new_tokens=32, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    got = np.asarray(generate(ours, ids, mask, max_new_tokens=32, eos_token_id=None, pad_token_id=PAD))
    np.testing.assert_array_equal(got, to_numpy(expected))


def test_generate_eos_stop_matches_transformers(lm_pair):
    """With an EOS that the model emits, rows stop at it and are filled with padding, as in transformers."""
    theirs, ours = lm_pair
    ids = np.array([[0, 0, 3, 5, 17, 42], [9, 23, 9, 64, 2, 71]])
    mask = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int64)
    free = np.asarray(generate(ours, ids, mask, max_new_tokens=32, eos_token_id=None, pad_token_id=PAD))
    eos = int(free[0, 6 + 4])  # a token row 0 produces at its 5th step
    with torch.no_grad():
        expected = to_numpy(theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32,
                                            do_sample=False, pad_token_id=PAD, eos_token_id=eos))
    got = np.asarray(generate(ours, ids, mask, max_new_tokens=32, eos_token_id=eos, pad_token_id=PAD))
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)
    assert (got[:, expected.shape[1]:] == PAD).all()  # transformers stops early; we keep a static shape


def test_greedy_generate_equals_no_cache_argmax(lm_pair):
    """The cached decoder picks the same tokens as re-running the full model on the growing sequence."""
    _, ours = lm_pair
    ids = np.array([[0, 0, 4, 8, 15], [16, 23, 42, 7, 1]])
    mask = (ids != 0).astype(np.int64)
    got = np.asarray(generate(ours, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=PAD))

    # One static shape: the sequence grows into a buffer whose unfilled tail is masked out. Causal attention
    # makes the logits at position t independent of that tail, so one jit compile serves every step.
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda ids, m: nnx.merge(graphdef, state)(ids, m))
    P = ids.shape[1]
    seq = np.concatenate([ids, np.full((2, 12), PAD)], 1)
    m = np.concatenate([mask, np.zeros((2, 12), np.int64)], 1)
    for t in range(12):
        seq[:, P + t] = np.asarray(forward(jnp.asarray(seq), jnp.asarray(m)))[:, P + t - 1].argmax(-1)
        m[:, P + t] = 1
    np.testing.assert_array_equal(got, seq)


def test_sampling_filters(lm_pair):
    """top_k=1 and a tiny top_p both reduce sampling to greedy; sampling is reproducible from the seed."""
    _, ours = lm_pair
    ids = np.array([[0, 4, 8, 15], [16, 23, 42, 7]])
    mask = (ids != 0).astype(np.int64)
    greedy = np.asarray(generate(ours, ids, mask, max_new_tokens=10, eos_token_id=None))
    kw = dict(max_new_tokens=10, eos_token_id=None, do_sample=True, temperature=0.7)
    np.testing.assert_array_equal(np.asarray(generate(ours, ids, mask, top_k=1, seed=1, **kw)), greedy)
    np.testing.assert_array_equal(np.asarray(generate(ours, ids, mask, top_p=1e-6, seed=2, **kw)), greedy)
    a = np.asarray(generate(ours, ids, mask, top_k=20, top_p=0.9, seed=3, **kw))
    b = np.asarray(generate(ours, ids, mask, top_k=20, top_p=0.9, seed=3, **kw))
    c = np.asarray(generate(ours, ids, mask, seed=4, **{**kw, "temperature": 5.0}))
    np.testing.assert_array_equal(a, b)
    assert (c != greedy).any()


def test_generate_rejects_right_padding(lm_pair):
    _, ours = lm_pair
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours, np.array([[4, 8, 0]]), np.array([[1, 1, 0]]), max_new_tokens=2)


def test_generate_compiles_once_per_shape_and_settings(lm_pair):
    """New prompts, seeds, temperatures and top-p values of the same shape reuse one compiled decoder."""
    from research.generate import _generate

    _, ours = lm_pair
    ids = np.array([[0, 4, 8], [16, 23, 42]])
    mask = (ids != 0).astype(np.int64)
    generate(ours, ids, mask, max_new_tokens=6, do_sample=True, top_k=5)
    before = _generate._cache_size()
    for s in range(3):
        generate(ours, ids + s, mask, max_new_tokens=6, do_sample=True, top_k=5, seed=s, temperature=0.5 + s,
                 top_p=0.5 + s / 10)
    assert _generate._cache_size() == before
