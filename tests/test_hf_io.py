"""Hugging Face checkpoints in and out: round trips through transformers, the weight file formats, key
prefixes, dtype, tokenizers, and every kind of bad input failing with the documented error."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import randomize_, to_numpy
from safetensors.numpy import load_file, save_file

from research.models import CheckpointError, CheckpointWarning, from_pretrained, load_tokenizer, save_pretrained

TINY_BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                 max_position_embeddings=32, num_labels=3, attn_implementation="eager")
TINY_GPT2 = dict(vocab_size=60, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=3, pad_token_id=0,
                 attn_implementation="eager")

CASES = [
    ("bert", "base", transformers.BertModel),
    ("bert", "sequence_classification", transformers.BertForSequenceClassification),
    ("bert", "token_classification", transformers.BertForTokenClassification),
    ("bert", "masked_lm", transformers.BertForMaskedLM),
    ("gpt2", "base", transformers.GPT2Model),
    ("gpt2", "causal_lm", transformers.GPT2LMHeadModel),
    ("gpt2", "sequence_classification", transformers.GPT2ForSequenceClassification),
]


def hf_checkpoint(tmp_path, cls, family, seed=0):
    cfg = transformers.BertConfig(**TINY_BERT) if family == "bert" else transformers.GPT2Config(**TINY_GPT2)
    model = randomize_(cls(cfg), seed)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def torch_output(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return to_numpy(out.logits if hasattr(out, "logits") else out.last_hidden_state)


IDS = np.array([[5, 9, 13, 2, 7, 1], [3, 8, 4, 11, 0, 0]])
MASK = (np.arange(6)[None] < np.array([[6], [4]])).astype(np.int64)


@pytest.mark.parametrize(("family", "task", "cls"), CASES, ids=[f"{f}-{t}" for f, t, _ in CASES])
def test_round_trip_through_transformers(tmp_path, family, task, cls):
    """load -> save_pretrained -> transformers loads it (no missing/unexpected keys) -> same outputs."""
    theirs, src = hf_checkpoint(tmp_path, cls, family)
    ours = from_pretrained(src, task)
    out = save_pretrained(ours, tmp_path / "ours")
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls.__name__]

    reloaded, info = cls.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    expected = torch_output(theirs, IDS, MASK)
    np.testing.assert_allclose(torch_output(reloaded.eval(), IDS, MASK), expected, atol=1e-6, rtol=0)
    got = np.asarray(ours(jnp.asarray(IDS), jnp.asarray(MASK)))
    # GPT-2 padding positions get position 0 in ours (see gpt2.py) and are ignored downstream.
    real = MASK == 1 if family == "gpt2" and task != "sequence_classification" else slice(None)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-5, rtol=0)


def test_minilm_fresh_head_to_pytorch(tmp_path, minilm_dir):
    """Real MiniLM + a freshly initialized classification head: the head is reported, and its weights go
    across to PyTorch through save_pretrained, giving the same logits; tokenizer files come along."""
    with pytest.warns(CheckpointWarning, match="classifier/kernel"):
        ours = from_pretrained(minilm_dir, "sequence_classification", num_labels=2)
    out = save_pretrained(ours, tmp_path / "cls")
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (minilm_dir / name).read_bytes()
    theirs, info = transformers.BertForSequenceClassification.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = load_tokenizer(out)
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(["a gripping, beautiful film", "dull and far too long"])
    ids, mask = np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc])
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask))),
                               torch_output(theirs.eval(), ids, mask), atol=1e-5, rtol=0)


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    theirs, src = hf_checkpoint(tmp_path, transformers.BertForMaskedLM, "bert")
    expected = torch_output(theirs, IDS, MASK)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = from_pretrained(tmp_path / "sharded", "masked_lm")
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(IDS), jnp.asarray(MASK))), expected, atol=1e-5)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(src / "config.json", pickled)
    torch.save(theirs.state_dict(), pickled / "pytorch_model.bin")
    ours = from_pretrained(pickled, "masked_lm")
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(IDS), jnp.asarray(MASK))), expected, atol=1e-5)


def test_prefixes_other_heads_and_buffers(tmp_path):
    # A pre-training-style checkpoint (bert. prefix + MLM head) loaded for classification: MLM head dropped
    # with a warning, classifier initialized with a warning, encoder identical.
    theirs, src = hf_checkpoint(tmp_path, transformers.BertForMaskedLM, "bert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = from_pretrained(src, "sequence_classification")
    messages = " ".join(str(w.message) for w in caught if w.category is CheckpointWarning)
    assert "cls.predictions.transform.dense.weight" in messages and "classifier/kernel" in messages
    np.testing.assert_array_equal(np.asarray(ours.bert.embeddings.word_embeddings.embedding[...]),
                                  to_numpy(theirs.bert.embeddings.word_embeddings.weight))

    # An old-style GPT-2 checkpoint: no "transformer." prefix, causal-mask buffers stored per layer.
    gpt, gsrc = hf_checkpoint(tmp_path / "g", transformers.GPT2LMHeadModel, "gpt2")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(gsrc / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((32, 32), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, gsrc / "model.safetensors", metadata={"format": "pt"})
    ours = from_pretrained(gsrc, "causal_lm")
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(IDS), jnp.asarray(MASK)))[MASK == 1],
                               torch_output(gpt, IDS, MASK)[MASK == 1], atol=1e-5)
    # ...and a corrupted buffer is caught, not ignored.
    tensors["h.1.attn.bias"] = np.ones((1, 1, 32, 32), np.float32)
    save_file(tensors, gsrc / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"h\.1\.attn\.bias"):
        from_pretrained(gsrc, "causal_lm")


def test_bfloat16(tmp_path):
    theirs, src = hf_checkpoint(tmp_path, transformers.GPT2LMHeadModel, "gpt2")
    ours = from_pretrained(src, "causal_lm", dtype="bfloat16")
    assert ours.transformer.wte.embedding[...].dtype == jnp.bfloat16
    logits = ours(jnp.asarray(IDS), jnp.asarray(MASK))
    assert logits.dtype == jnp.float32
    expected = torch_output(theirs, IDS, MASK)
    err = np.abs(np.asarray(logits) - expected)[MASK == 1].max()
    assert err < 0.05 * np.abs(expected).max(), err
    out = save_pretrained(ours, tmp_path / "bf16")
    reloaded = from_pretrained(out, "causal_lm", dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(IDS), jnp.asarray(MASK))), np.asarray(logits))


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def bert_dir(tmp_path):
    _, src = hf_checkpoint(tmp_path, transformers.BertForSequenceClassification, "bert")
    return src


def edit_tensors(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(bert_dir):
    edit_tensors(bert_dir, lambda t: [t.pop("bert.encoder.layer.1.output.dense.bias"),
                                      t.pop("bert.embeddings.LayerNorm.weight")])
    with pytest.raises(CheckpointError, match="missing tensors") as e:
        from_pretrained(bert_dir, "sequence_classification")
    assert "bert.encoder.layer.1.output.dense.bias" in str(e.value)
    assert "bert.embeddings.LayerNorm.weight" in str(e.value)
    with pytest.warns(CheckpointWarning, match="layers/1/mlp/output/bias"):
        from_pretrained(bert_dir, "sequence_classification", strict=False)


def test_unexpected_tensor(bert_dir):
    edit_tensors(bert_dir, lambda t: t.update({"bert.encoder.layer.0.adapter.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors:\n  bert\.encoder\.layer\.0\.adapter\.weight"):
        from_pretrained(bert_dir, "sequence_classification")


def test_wrong_shape_and_problems_collected_together(bert_dir):
    def edit(t):
        t["bert.encoder.layer.0.attention.self.query.weight"] = np.zeros((16, 8), np.float32)
        t.pop("bert.encoder.layer.1.intermediate.dense.bias")
        t["stray"] = np.zeros(1, np.float32)
    edit_tensors(bert_dir, edit)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(bert_dir, "sequence_classification")
    msg = str(e.value)
    assert "bert.encoder.layer.0.attention.self.query.weight: checkpoint (16, 8), model expects (16, 16)" in msg
    assert "missing tensors:\n  bert.encoder.layer.1.intermediate.dense.bias\n" in msg
    assert "unexpected tensors:\n  stray" in msg


def test_vocab_size_mismatch(bert_dir):
    cfg = json.loads((bert_dir / "config.json").read_text())
    cfg["vocab_size"] = 64
    (bert_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vocab size mismatch.*vocab_size=64"):
        from_pretrained(bert_dir, "sequence_classification")


def test_label_count_mismatch_is_an_error(bert_dir):
    with pytest.raises(CheckpointError, match=r"classifier.weight: checkpoint \(3, 16\), model expects \(5, 16\)"):
        from_pretrained(bert_dir, "sequence_classification", num_labels=5)


def test_unknown_override_and_unsupported_config(bert_dir):
    with pytest.raises(ValueError, match="'hiden_dropout_prob' \\(did you mean 'hidden_dropout_prob'\\?\\)"):
        from_pretrained(bert_dir, "sequence_classification", hiden_dropout_prob=0.2)
    cfg = json.loads((bert_dir / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (bert_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="position_embedding_type='relative_key' is not implemented"):
        from_pretrained(bert_dir, "sequence_classification")


def test_unknown_task(bert_dir):
    with pytest.raises(ValueError, match="task 'causal_lm' is not available"):
        from_pretrained(bert_dir, "causal_lm")


def test_truncated_safetensors(bert_dir):
    path = bert_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        from_pretrained(bert_dir, "sequence_classification")


class _Evil:
    """Unpickling this runs code: it would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_nothing_executes(bert_dir, tmp_path):
    marker = tmp_path / "pwned"
    (bert_dir / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(50, 16), "payload": _Evil(str(marker))},
               bert_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load .*pytorch_model.bin"):
        from_pretrained(bert_dir, "sequence_classification")
    assert not marker.exists()


def test_pickle_without_torch_gives_clear_error(bert_dir, tmp_path):
    (bert_dir / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, bert_dir / "pytorch_model.bin")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from research.models import from_pretrained, CheckpointError\n"
            f"try:\n    from_pretrained({str(bert_dir)!r}, 'sequence_classification')\n"
            "except CheckpointError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "needs torch, which is not installed" in out


def test_hub_id_offline_without_cache(tmp_path):
    code = ("from research.models import from_pretrained\n"
            "try:\n    from_pretrained('no-such-org/no-such-model')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.startswith("CheckpointError") and "HF_HUB_OFFLINE=1" in out


def test_hub_id_resolves_from_the_cache_offline(tmp_path, minilm_dir):
    """A hub id is resolved through huggingface_hub's cache layout (as a previous online run leaves it)."""
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (snapshot / name).symlink_to(minilm_dir / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    code = ("from research.models import from_pretrained, load_tokenizer\n"
            "m = from_pretrained('sentence-transformers/all-MiniLM-L6-v2')\n"
            "print(m.hf_source)\n"
            "print(load_tokenizer('sentence-transformers/all-MiniLM-L6-v2').encode('hi').ids)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines() == [str(snapshot), "[101, 7632, 102]"]


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        from_pretrained(tmp_path / "nowhere" / "deep" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path / "empty")


# ------------------------------------------------------------------------------------------- tokenizers


def test_minilm_tokenizer_equals_transformers(minilm_dir):
    ours = load_tokenizer(minilm_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    texts = ["Hello, World!", "Naïve café owners don't over-think it.", "x " * 300]
    for text in texts:
        assert ours.encode(text).ids == theirs(text)["input_ids"]  # no silent truncation at 128/512 either


def test_gpt2_tokenizer_from_vocab_and_merges(data_dir, tmp_path):
    src = data_dir / "tokenizers" / "gpt2"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "config.json").write_text("{}")
    ours = load_tokenizer(tmp_path)
    theirs = transformers.GPT2TokenizerFast(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"))
    for text in ["Hello world", " leading space and   runs", "Ünïcödé — emoji 🤗 <|endoftext|>", "123,456.78"]:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
