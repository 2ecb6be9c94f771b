"""Packed batches (research.data.classification.pack): several examples per row, attention kept inside each.

- the layout: every example exactly once, whole, at its pool_index, positions restarting at 0, and no
  example crossing a micro-batch or a device shard;
- the model: an example's logits are the same packed or padded, for the real all-MiniLM-L6-v2 (and a
  control: without the segment mask they are not);
- training: a packed run equals a padded one (no dropout: same math), also with gradient accumulation and
  on 8 simulated devices;
- a model that cannot take packed rows is refused before anything compiles;
- tagging (token classification) packs too: the same token logits, targets and weights, and the same training
  runs, with accumulation and on 8 devices.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CONLL, CONLL_TINY, conll, records, run_on_one_and_eight_devices, smoke

from research.config import ConfigError
from research.data.batches import collate, pack
from research.data.split import Split, SplitReport
from research.experiment import prepare
from research.models import from_pretrained
from research.train import train

NO_DROPOUT = ["model.overrides.hidden_dropout_prob=0", "model.overrides.attention_probs_dropout_prob=0"]


def random_split(n: int, max_length: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_length + 1, n)
    ids = [np.concatenate([[101], rng.integers(1000, 20000, k - 2), [102]]).astype(np.int32) for k in lengths]
    types = [(np.arange(k) >= k // 2).astype(np.int32) for k in lengths]  # a sentence pair: type ids matter
    return Split("random", ids, types, rng.integers(0, 2, n).astype(np.int32), [""] * n, SplitReport("random", ""))


@pytest.mark.parametrize("micro_batches,shards", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_every_example_is_packed_once_whole_and_inside_its_group(micro_batches, shards):
    split = random_split(32, 64)
    indices = np.random.default_rng(1).permutation(32)
    batch = pack(split, indices, np.ones(32, np.float32), 64, 0, micro_batches, shards)
    groups = micro_batches * shards
    n_rows = batch.input_ids.shape[0] // groups
    assert batch.input_ids.shape == (groups * n_rows, 64) and batch.pool_index.shape == (32, 2)
    per_micro, per_group = 32 // micro_batches, 32 // groups
    seen = np.zeros_like(batch.segment_ids)
    for j, i in enumerate(indices):
        micro, group = j // per_micro, j // per_group
        local_row, start = batch.pool_index[j]
        row = micro * shards * n_rows + local_row  # pool_index counts rows from the micro-batch's first
        assert row // n_rows == group, f"example {j} left its group (micro-batch x shard)"
        end = start + len(split.input_ids[i])
        np.testing.assert_array_equal(batch.input_ids[row, start:end], split.input_ids[i])
        np.testing.assert_array_equal(batch.token_type_ids[row, start:end], split.token_type_ids[i])
        np.testing.assert_array_equal(batch.position_ids[row, start:end], np.arange(end - start))
        segment = batch.segment_ids[row, start]
        assert segment > 0 and (batch.segment_ids[row] == segment).sum() == end - start
        seen[row, start:end] += 1
    # Every non-padding slot belongs to exactly one example; padding is segment 0, masked, pad id.
    np.testing.assert_array_equal(seen, batch.attention_mask)
    np.testing.assert_array_equal(batch.segment_ids > 0, batch.attention_mask == 1)
    assert (batch.input_ids[batch.attention_mask == 0] == 0).all()
    np.testing.assert_array_equal(batch.labels, split.labels[indices])
    # First-fit decreasing needs at most 11/9 OPT + 6/9 rows (Dosa 2007); OPT is at least the rows the
    # tokens fill and the number of examples longer than half a row.
    bounds = []
    for g in range(groups):
        lengths = [len(split.input_ids[i]) for i in indices[g * per_group:(g + 1) * per_group]]
        optimum_at_least = max(-(-sum(lengths) // 64), sum(k > 32 for k in lengths))
        bounds.append(optimum_at_least)
    assert max(bounds) <= n_rows <= (11 * max(bounds) + 6) // 9


def test_an_example_longer_than_a_row_is_an_error():
    split = random_split(4, 64)
    with pytest.raises(ValueError, match="does not fit a packed row of 32: set data.pack_length"):
        pack(split, np.arange(4), np.ones(4, np.float32), 32, 0)


def test_packed_logits_equal_padded_logits_on_real_minilm(minilm_dir):
    model = from_pretrained(minilm_dir, "sequence_classification", num_labels=2)
    model.eval()
    split = random_split(32, 64)
    indices, weights = np.arange(32), np.ones(32, np.float32)
    padded, packed = collate(split, indices, weights, 64, 0), pack(split, indices, weights, 64, 0)
    assert packed.input_ids.size < padded.input_ids.size * 0.7  # it did pack
    logits_padded = model(**{k: jnp.asarray(v) for k, v in padded.model_inputs().items()})
    logits_packed = model(**{k: jnp.asarray(v) for k, v in packed.model_inputs().items()})
    np.testing.assert_allclose(logits_packed, logits_padded, atol=1e-5)
    # Control: the same rows attending across examples (no segment mask) give other logits.
    leaky = packed.replace(segment_ids=packed.attention_mask)
    logits_leaky = model(**{k: jnp.asarray(v) for k, v in leaky.model_inputs().items()})
    assert np.abs(np.asarray(logits_leaky) - np.asarray(logits_padded)).max() > 1e-2


@pytest.mark.parametrize("accum", [1, 4])
def test_a_packed_run_equals_a_padded_run(tmp_path, data_dir, accum):
    base = [*NO_DROPOUT, "train.max_steps=3", "train.eval_every=null", "train.log_every=1", f"train.grad_accum={accum}"]
    train(smoke(*base), tmp_path / "padded")
    train(smoke(*base, "data.pack_length=32"), tmp_path / "packed")
    padded = [r for r in records(tmp_path / "padded") if "train/loss" in r]
    packed = [r for r in records(tmp_path / "packed") if "train/loss" in r]
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/update_norm", "train/param_norm"):
        np.testing.assert_allclose([r[key] for r in packed], [r[key] for r in padded], rtol=1e-5, err_msg=key)
    # Same real tokens counted, in fewer slots.
    assert [r["train/tokens_per_s"] > 0 for r in packed] == [True] * 3


def test_packed_on_eight_simulated_devices_matches_one(tmp_path, data_dir):
    # Packing depends on the shard count (each device's examples are packed apart), so dropout draws land
    # on other slots: compare without dropout, where the math is the same.
    one, eight = run_on_one_and_eight_devices(tmp_path, *NO_DROPOUT, "data.pack_length=32")
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    for name in one["params"]:
        np.testing.assert_allclose(eight["params"][name], one["params"][name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_packing_is_checked_against_the_config_and_the_model(data_dir, monkeypatch):
    with pytest.raises(ConfigError, match="data.pack_length=16 must be at least data.max_length=32"):
        smoke("data.pack_length=16")
    # GPT-2's classification head pools the last real token of each row: it takes no packed rows (yet).
    from research import experiment
    from research.models import from_config
    from research.models.gpt2 import GPT2Config

    tiny = GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=1, n_head=2, pad_token_id=0)
    monkeypatch.setattr(experiment, "build_model",
                        lambda cfg, labels, init_adapter=True: from_config(tiny, "sequence_classification"))
    with pytest.raises(ConfigError, match="GPT2ForSequenceClassification does not take packed rows"):
        prepare(smoke("data.pack_length=32", "data.max_train_examples=32", "data.max_dev_examples=8"))


def test_gpt2_batches_carry_no_token_types(data_dir, monkeypatch):
    # HF's GPT-2 tokenizer returns no token_type_ids, and GPT-2 given zeros adds wte[0] to every position.
    from research import experiment
    from research.data.batches import collate
    from research.models import from_config
    from research.models.gpt2 import GPT2Config

    tiny = GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=1, n_head=2, pad_token_id=0)
    monkeypatch.setattr(experiment, "build_model",
                        lambda cfg, labels, init_adapter=True: from_config(tiny, "sequence_classification"))
    pieces = prepare(smoke("data.max_train_examples=32", "data.max_dev_examples=8"))
    assert pieces.train.token_type_ids is None and pieces.dev.token_type_ids is None
    batch = collate(pieces.dev, np.arange(4), np.ones(4), 32, pieces.pad_id)
    assert batch.token_type_ids is None and batch.input_ids.shape == (4, 32)


# ------------------------------------------------------------------------------------------ token tasks


def test_packed_token_logits_targets_and_weights_equal_padded_on_real_minilm(minilm_dir):
    model = from_pretrained(minilm_dir, "token_classification", num_labels=5)
    model.eval()
    split = random_split(32, 40)
    rng = np.random.default_rng(3)  # a tag on some pieces, -1 elsewhere ([CLS], [SEP], continuation pieces)
    targets = [np.where(rng.random(len(x)) < 0.6, rng.integers(0, 5, len(x)), -1).astype(np.int32)
               for x in split.input_ids]
    for x in targets:
        x[[0, -1]] = -1
    split = dataclasses.replace(split, token_targets=targets, labels=np.full(len(split), -1, np.int32))
    indices, weights = np.arange(32), np.where(np.arange(32) == 5, 0, 1).astype(np.float32)  # example 5: a filler
    padded, packed = collate(split, indices, weights, 40, 0), pack(split, indices, weights, 64, 0)
    assert packed.input_ids.size < padded.input_ids.size * 0.8  # it did pack
    logits_padded = np.asarray(model(**{k: jnp.asarray(v) for k, v in padded.model_inputs().items()}))
    logits_packed = np.asarray(model(**{k: jnp.asarray(v) for k, v in packed.model_inputs().items()}))
    for j, i in enumerate(indices):  # every example's tokens: the same logits, targets and weights
        row, start = packed.pool_index[j]
        n = len(split.input_ids[i])
        np.testing.assert_allclose(logits_packed[row, start : start + n], logits_padded[j, :n], atol=1e-5)
        np.testing.assert_array_equal(packed.labels[row, start : start + n], padded.labels[j, :n])
        np.testing.assert_array_equal(packed.label_weights[row, start : start + n], padded.label_weights[j, :n])
    assert packed.label_weights.sum() == padded.label_weights.sum() > 0


def test_a_packed_tagging_run_equals_a_padded_run(tmp_path, data_dir):
    # With 3 micro-batches: each packs its own examples, and the accumulated step equals the padded one.
    no_dropout = ["model.overrides.hidden_dropout_prob=0", "model.overrides.attention_probs_dropout_prob=0",
                  "train.eval_every=null", "train.grad_accum=3", "train.batch_size=12", "data.test={}",
                  "data.max_dev_examples=32"]
    train(conll(*no_dropout), tmp_path / "padded")
    train(conll(*no_dropout, "data.pack_length=64"), tmp_path / "packed")
    padded = [r for r in records(tmp_path / "padded") if "train/loss" in r]
    packed = [r for r in records(tmp_path / "packed") if "train/loss" in r]
    assert len(packed) == 3
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/update_norm", "train/param_norm"):
        np.testing.assert_allclose([r[key] for r in packed], [r[key] for r in padded], rtol=1e-5, err_msg=key)
    final = [r for r in records(tmp_path / "packed") if "dev/entity_f1" in r]
    assert final and final[-1]["dev/entity_f1"] == pytest.approx(
        [r for r in records(tmp_path / "padded") if "dev/entity_f1" in r][-1]["dev/entity_f1"], abs=1e-6)


def test_packed_tagging_on_eight_simulated_devices_matches_one(tmp_path, data_dir):
    overrides = [*CONLL_TINY, "model.overrides.hidden_dropout_prob=0", "model.overrides.attention_probs_dropout_prob=0",
                 "data.pack_length=64", "train.batch_size=16", "data.test={}", "data.max_dev_examples=16"]
    one, eight = run_on_one_and_eight_devices(tmp_path, *overrides, experiment=CONLL)
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    for name in one["params"]:
        np.testing.assert_allclose(eight["params"][name], one["params"][name], rtol=1e-4, atol=1e-6, err_msg=name)
