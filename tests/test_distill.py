"""Knowledge distillation: the KD loss and its gradients against PyTorch, KD at alpha 0 / T 1 as supervised
training, the cached teacher logits against the teacher's own forward, the runner with a teacher, and the
errors a wrong teacher gets (research/objectives/distillation.py, research/compress/teacher.py)."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import check_objective, our_grads_by_hf_name, params_of, records, shakespeare_lm, smoke, tiny_batch

from research import experiment
from research.batch import Batch
from research.compress import teacher as teacher_lib
from research.config import (
    ConfigError,
    DistillConfig,
    ObjectiveConfig,
    OptimConfig,
)
from research.models import from_pretrained
from research.objectives.distillation import KDOptions, distillation_loss, kd
from research.objectives.supervised import CrossEntropyOptions, cross_entropy
from research.train import train

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def batch():  # the third example a filler (weight 0): it must count nowhere
    teacher_logits = np.random.default_rng(1).normal(0, 2, (4, 3)).astype(np.float32)
    return tiny_batch(weights=(1, 1, 0, 1), teacher_logits=teacher_logits)


def torch_kd(student, teacher, labels, weights, alpha, t):
    """The reference: Hinton et al.'s loss, weighted mean over examples (or tokens) as torch users write it."""
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                  reduction="none").sum(-1)
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), labels.reshape(-1), reduction="none")
    w = weights.reshape(-1)
    return (alpha * t * t * (kl.reshape(-1) * w).sum() + (1 - alpha) * (ce * w).sum()) / w.sum()


@pytest.mark.parametrize(("alpha", "temperature"), [(0.5, 2.0), (0.9, 4.0), (1.0, 1.0)])
def test_kd_matches_pytorch(tiny_bert_pair, batch, alpha, temperature):
    # Loss 1e-5 relative, every parameter's gradient 1e-4 of its scale; the filler example (weight 0) counts
    # in neither.
    theirs, _ = tiny_bert_pair
    theirs.zero_grad(set_to_none=True)
    logits = theirs(input_ids=torch.tensor(batch.input_ids).long(),
                    attention_mask=torch.tensor(batch.attention_mask).long()).logits
    loss = torch_kd(logits, torch.tensor(batch.teacher_logits), torch.tensor(batch.labels).long(),
                    torch.tensor(batch.weights), alpha, temperature)
    loss.backward()
    check_objective(tiny_bert_pair, kd(KDOptions(alpha=alpha, temperature=temperature)), loss, batch)


def test_token_kd_matches_pytorch():
    # Per token, weighted by label_weights (padding and non-first word pieces weigh 0): loss and the gradient
    # with respect to the student's logits.
    rng = np.random.default_rng(1)
    student = rng.normal(0, 2, (3, 7, 5)).astype(np.float32)
    b = Batch(input_ids=np.zeros((3, 7), np.int32), attention_mask=np.ones((3, 7), np.int32),
              labels=rng.integers(0, 5, (3, 7)).astype(np.int32), weights=np.ones(3, np.float32),
              label_weights=(rng.random((3, 7)) > 0.3).astype(np.float32),
              teacher_logits=rng.normal(0, 2, (3, 7, 5)).astype(np.float32))
    o = KDOptions(alpha=0.7, temperature=3.0)
    bj = jax.tree.map(jnp.asarray, b)
    loss, grad = jax.value_and_grad(lambda s: distillation_loss(s, bj, o)[0])(jnp.asarray(student))
    s = torch.tensor(student, requires_grad=True)
    ref = torch_kd(s, torch.tensor(b.teacher_logits), torch.tensor(b.labels).long(), torch.tensor(b.label_weights),
                   o.alpha, o.temperature)
    ref.backward()
    np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), s.grad.numpy(), rtol=0, atol=1e-4 * float(s.grad.abs().max()))


def test_kd_at_alpha_0_and_temperature_1_is_cross_entropy(tiny_bert_pair, batch):
    _, mine = tiny_bert_pair
    b = jax.tree.map(jnp.asarray, batch)
    kd_loss, kd_grads = our_grads_by_hf_name(mine, lambda m: kd(KDOptions(alpha=0.0, temperature=1.0))(m, b, KEY)[0],
                                             "sequence_classification")
    ce_loss, ce_grads = our_grads_by_hf_name(mine, lambda m: cross_entropy(CrossEntropyOptions())(m, b, KEY)[0],
                                             "sequence_classification")
    assert kd_loss == ce_loss
    for name, g in ce_grads.items():
        np.testing.assert_array_equal(kd_grads[name], g, err_msg=name)


# ------------------------------------------------------------------------------------ the teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, minilm_dir):
    """A small random BERT classifier over MiniLM's tokenizer and SST-2's labels, as transformers saves it."""
    import transformers

    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, id2label={0: "0", 1: "1"},
                                  label2id={"0": 0, "1": 1})
    transformers.BertForSequenceClassification(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, out / name)
    return out


def kd_config(teacher, cache, *more):
    return smoke("objective.name=kd", f"distill.teacher={teacher}", f"distill.cache_dir={cache}", *more)


def test_cached_teacher_logits_equal_the_teachers_forward(tmp_path, teacher_dir, monkeypatch):
    cfg = kd_config(teacher_dir, tmp_path / "cache")
    pieces = experiment.prepare(cfg)
    assert teacher_lib.prepare_teacher(cfg, pieces, tmp_path, resuming=False) is None  # cached: not in the step
    split = pieces.train
    assert split.teacher_logits.shape == (len(pieces.train), 2)
    # The teacher alone, one example at a time (no padding, no batching): the cached rows are its logits.
    model = from_pretrained(teacher_dir, "sequence_classification")
    for i in range(0, len(split), 37):
        ids = split.input_ids[i][None]
        np.testing.assert_allclose(split.teacher_logits[i], np.asarray(model(jnp.asarray(ids)))[0], rtol=0,
                                   atol=1e-5, err_msg=f"example {i}")
    about = json.loads((tmp_path / "teacher.json").read_text())
    assert about["in_step"] is False and Path(about["cache"]).parent == tmp_path / "cache"
    # The second time, from the cache: nothing is computed, the values are the same.
    monkeypatch.setattr(teacher_lib, "compute_logits", lambda *a: pytest.fail("the cache was not used"))
    teacher_lib.prepare_teacher(cfg, pieces, tmp_path, resuming=True)
    np.testing.assert_array_equal(pieces.train.teacher_logits, split.teacher_logits)
    # A damaged cache file is an error that names it, not a silent recomputation.
    (cached,) = (tmp_path / "cache").glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"{cached.name}.*do not load.*delete"):
        teacher_lib.prepare_teacher(cfg, pieces, tmp_path, resuming=True)


def test_a_teacher_with_other_labels_or_another_tokenizer_is_refused(tmp_path, teacher_dir, data_dir):
    pieces = experiment.prepare(kd_config(teacher_dir, tmp_path))
    swapped = tmp_path / "swapped"
    shutil.copytree(teacher_dir, swapped)
    hf = json.loads((swapped / "config.json").read_text())
    hf["id2label"], hf["label2id"] = {"0": "1", "1": "0"}, {"1": 0, "0": 1}
    (swapped / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=r"predicts labels \['1', '0'\], the student \['0', '1'\]"):
        teacher_lib.prepare_teacher(kd_config(swapped, tmp_path), pieces, tmp_path, resuming=False)
    other = tmp_path / "gpt2_tokenizer"
    shutil.copytree(teacher_dir, other)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (other / name).unlink()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(data_dir / "tokenizers" / "gpt2" / name, other / name)
    with pytest.raises(ConfigError, match="another tokenizer"):
        teacher_lib.prepare_teacher(kd_config(other, tmp_path), pieces, tmp_path, resuming=False)


@pytest.mark.parametrize(("overrides", "message"), [
    (["objective.name=kd"], "learns from a teacher: set distill.teacher"),
    (["distill.teacher=runs/x"], "distill.teacher is set but objective.name='cross_entropy' does not use it"),
])
def test_distillation_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        smoke(*overrides)


def test_kd_options_are_checked(tmp_path, teacher_dir):
    from research.objectives import make_objective

    with pytest.raises(ConfigError, match=r"alpha=1.5: a weight in \[0, 1\]"):
        make_objective(kd_config(teacher_dir, tmp_path, "objective.params.alpha=1.5").objective)
    with pytest.raises(ConfigError, match="temperature=0.0: must be positive"):
        make_objective(kd_config(teacher_dir, tmp_path, "objective.params.temperature=0.0").objective)


# ------------------------------------------------------------------------------------------- the runner


def test_a_token_task_gets_per_token_teacher_logits_in_its_batches():
    from research.data.batches import collate
    from research.data.split import Split, SplitReport

    rng = np.random.default_rng(0)
    lengths = [3, 5, 2]
    split = Split("train", [rng.integers(1, 9, n).astype(np.int32) for n in lengths], None,
                  np.full(3, -1, np.int32), ["a", "b", "c"], SplitReport("train", "test"),
                  token_targets=[rng.integers(-1, 4, n).astype(np.int32) for n in lengths],
                  teacher_logits=[rng.normal(size=(n, 4)).astype(np.float32) for n in lengths])
    b = collate(split, np.array([2, 0, 1]), np.ones(3, np.float32), 6, 0)
    assert b.teacher_logits.shape == (3, 6, 4)
    for row, i in enumerate([2, 0, 1]):
        np.testing.assert_array_equal(b.teacher_logits[row, : lengths[i]], split.teacher_logits[i])
        assert not b.teacher_logits[row, lengths[i]:].any()  # padding: zeros, weighing nothing


# ----------------------------------------------------------------------------- the student's initialization


def test_a_student_from_every_other_layer_equals_the_teacher_with_those_layers(tmp_path):
    # DistilBERT's initialization: layers (0, 2) of a 3-layer BERT, renumbered 0 and 1. transformers' model with
    # its other layers deleted is the reference (logits 1e-5); the export loads back into transformers.
    import transformers
    from helpers import randomize_

    from research.models import save_pretrained

    cfg = transformers.BertConfig(vocab_size=83, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=40, num_labels=2, attn_implementation="eager")
    full = randomize_(transformers.BertForSequenceClassification(cfg), seed=5)
    full.save_pretrained(tmp_path / "teacher")
    student = from_pretrained(tmp_path / "teacher", "sequence_classification", layers=(0, 2))
    assert student.config.num_hidden_layers == 2
    full.bert.encoder.layer = torch.nn.ModuleList([full.bert.encoder.layer[0], full.bert.encoder.layer[2]])
    ids = np.random.default_rng(0).integers(1, 83, (3, 9))
    expected = full(input_ids=torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(student(jnp.asarray(ids, jnp.int32))), expected, rtol=0, atol=1e-5)
    save_pretrained(student, tmp_path / "student")
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    assert back.config.num_hidden_layers == 2
    np.testing.assert_allclose(back(input_ids=torch.tensor(ids)).logits.detach().numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("layers", "message"), [((0, 3), "has layers 0 to 2"), ((1, 1), "at most once")])
def test_bad_student_layers_are_refused(tmp_path, layers, message):
    import transformers

    from research.models.hf import CheckpointError

    transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=83, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40)
    ).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(tmp_path, "sequence_classification", layers=layers)
    with pytest.raises(CheckpointError, match="leave num_hidden_layers out"):
        from_pretrained(tmp_path, "sequence_classification", layers=(0,), num_hidden_layers=1)
    with pytest.raises(ConfigError, match="model.layers picks layers of a pretrained checkpoint"):
        smoke("model.layers=[0]")


# --------------------------------------------------------------------------------- the teacher in the step


def test_distillation_runs_from_a_run_directory_cached_or_in_the_step(tmp_path, teacher_dir):
    # The teacher is itself a run (the smoke model, 4 steps); students distil from its best checkpoint with
    # the logits cached, then with the teacher in the step (the same records, 1e-5), then with TinyBERT's loss;
    # packed batches throughout. The teacher never enters a student's checkpoint, and --resume refuses another.
    short = ("train.max_steps=4", "train.eval_every=4", "checkpoint.every_steps=4", "train.log_every=1",
             "data.pack_length=32", "data.buckets=[32]")  # one eval shape per run: five runs compile less
    train(smoke(*short, "checkpoint.best_metric=dev/accuracy"), tmp_path / "teacher")
    teacher, cache = tmp_path / "teacher", tmp_path / "cache"
    train(kd_config(teacher, cache, *short), tmp_path / "cached")
    train(kd_config(teacher, cache, *short, "distill.in_step=true"), tmp_path / "in_step")
    cached, in_step = records(tmp_path / "cached"), records(tmp_path / "in_step")
    # The teacher's logits come from padded eval batches or from the step's packed rows: equal to float32
    # rounding. The KL between two nearly equal distributions is ~1e-6 and a difference of such roundings, so it
    # gets an absolute tolerance too (the two were 2e-9 apart with XLA on two threads, in a plain `-n 0` run).
    for a, b in zip(cached, in_step, strict=True):
        for key in ("train/loss", "train/kd", "train/ce", "dev/accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (a["step"], key)
    assert all(0 < r["train/kd"] for r in cached if "train/kd" in r)
    about = json.loads((tmp_path / "cached" / "teacher.json").read_text())
    assert about["description"].startswith(f"run {teacher} (best checkpoint") and about["in_step"] is False
    assert json.loads((tmp_path / "in_step" / "teacher.json").read_text())["in_step"] is True
    _, params = params_of(tmp_path / "in_step")
    assert not any("teacher" in name for name in params)  # frozen: not a parameter, not checkpointed
    with pytest.raises(ConfigError, match="--resume: this run was distilled from"):
        train(kd_config(teacher_dir, cache, *short, "train.max_steps=8"), tmp_path / "cached", resume=True)
    # TinyBERT's objective in the runner: the loss is its three terms (alpha 1, T 1), each logged.
    tinybert = kd_config(teacher, cache, *short, "distill.in_step=true", "objective.name=tinybert",
                         "checkpoint.every_steps=2")
    train(tinybert, tmp_path / "tinybert")
    logged = [r for r in records(tmp_path / "tinybert") if "train/hidden_mse" in r]
    assert len(logged) == 4 and all(r["train/hidden_mse"] > 0 and r["train/attention_mse"] > 0 for r in logged)
    for r in logged:
        assert r["train/loss"] == pytest.approx(r["train/kd"] + r["train/hidden_mse"] + r["train/attention_mse"],
                                                rel=1e-5)
    # Its learned projection W_h trains in the train state, apart from the model: the model's checkpoint and
    # export never hold it, and --resume carries it on.
    _, params = params_of(tmp_path / "tinybert")
    assert not any("projection" in name for name in params)
    checkpoint = tmp_path / "tinybert" / "checkpoints" / "4"  # orbax's tree metadata names every saved array
    assert "objective_params" in (checkpoint / "train" / "_METADATA").read_text()
    assert "distill_projection" not in (checkpoint / "params" / "_METADATA").read_text()
    train(tinybert, tmp_path / "tinybert", resume=True, resume_step=2)  # steps 3 and 4 again, from step 2's W_h
    again = [r for r in records(tmp_path / "tinybert") if "train/hidden_mse" in r]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(logged, again, strict=True):
        assert b["train/hidden_mse"] == pytest.approx(a["train/hidden_mse"], rel=1e-6), a["step"]


def test_gpt2_distils_token_by_token_from_a_teacher_in_the_step(tmp_path, tiny_gpt2_dir, data_dir):
    # The teacher is the student's own starting checkpoint (no dropout): at the first step the two
    # distributions are equal, so the KL term is 0, and it grows as the cross-entropy half moves the student.
    cfg = shakespeare_lm(tiny_gpt2_dir, tmp_path, data_dir,
                         objective=ObjectiveConfig(name="kd", params={"alpha": 0.5, "temperature": 1.0}),
                         distill=DistillConfig(teacher=str(tiny_gpt2_dir), in_step=True),
                         optim=OptimConfig(lr=1e-2, warmup_ratio=0.0))
    train(cfg, tmp_path / "lm")
    kd_terms = [r["train/kd"] for r in records(tmp_path / "lm") if "train/kd" in r]
    assert kd_terms[0] == pytest.approx(0.0, abs=1e-6) and kd_terms[-1] > 1e-4
    with pytest.raises(ConfigError, match="set distill.in_step=true"):
        dataclasses.replace(cfg, distill=DistillConfig(teacher=str(tiny_gpt2_dir)))


# ------------------------------------------------------------------------- intermediate layers (TinyBERT)


def torch_intermediates(model, ids, mask):
    """Logits, hidden states and every layer's attention scores before the softmax (B, nh, T, S), from hooks
    on the query and key projections (transformers returns the probabilities, not the scores)."""
    queries, keys = [], []
    hooks = [layer.attention.self.query.register_forward_hook(lambda m, i, o: queries.append(o))
             for layer in model.bert.encoder.layer]
    hooks += [layer.attention.self.key.register_forward_hook(lambda m, i, o: keys.append(o))
              for layer in model.bert.encoder.layer]
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for h in hooks:
        h.remove()
    nh = model.config.num_attention_heads
    split = lambda x: x.view(x.shape[0], x.shape[1], nh, -1).transpose(1, 2)  # noqa: E731
    scale = model.config.hidden_size // nh
    scores = [split(q) @ split(k).transpose(-1, -2) / scale**0.5 for q, k in zip(queries, keys, strict=True)]
    return out.logits, out.hidden_states, scores


@pytest.mark.parametrize("projection", ["none", "learned"])
def test_tinybert_matches_pytorch(tiny_bert_pair, batch, tmp_path, projection):
    # Student: the 2-layer tiny BERT (32 wide); teacher: a 4-layer one, so student layer m learns from teacher
    # layer 2m: as wide without a projection, 48 wide through TinyBERT's learned W_h (one nn.Linear 32 -> 48 on
    # every hidden state, the embeddings' too, as TinyBERT's fit_dense). Loss 1e-5, every student gradient and
    # W_h's 1e-4; the filler example (weight 0) counts nowhere.
    import transformers
    from helpers import randomize_

    from research.objectives.distillation import PROJECTION, IntermediateOptions, intermediate, projection_for

    width = 32 if projection == "none" else 48
    cfg = transformers.BertConfig(vocab_size=83, hidden_size=width, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=40, num_labels=3, attn_implementation="eager")
    t_teacher = randomize_(transformers.BertForSequenceClassification(cfg), seed=7)
    t_teacher.save_pretrained(tmp_path)
    theirs, mine = tiny_bert_pair
    o = IntermediateOptions(hidden_weight=0.7, attention_weight=0.3, alpha=0.6, temperature=2.0, projection=projection)
    teacher = teacher_lib.frozen(from_pretrained(tmp_path, "sequence_classification"))
    extra = projection_for(o, mine, teacher, seed=3)
    assert list(extra) == ([] if projection == "none" else [PROJECTION])
    if extra:  # torch's W_h, the same weights
        theirs.distill_projection = torch.nn.Linear(32, width)
        with torch.no_grad():
            theirs.distill_projection.weight.copy_(torch.tensor(np.asarray(extra[PROJECTION].kernel[...]).T))
            theirs.distill_projection.bias.copy_(torch.tensor(np.asarray(extra[PROJECTION].bias[...])))
    theirs.zero_grad(set_to_none=True)
    ids, mask = torch.tensor(batch.input_ids).long(), torch.tensor(batch.attention_mask).long()
    logits, hidden_s, scores_s = torch_intermediates(theirs, ids, mask)
    if extra:
        hidden_s = [theirs.distill_projection(h) for h in hidden_s]
    with torch.no_grad():
        t_logits, hidden_t, scores_t = torch_intermediates(t_teacher, ids, mask)
    w = torch.tensor(batch.weights)
    w_bt = mask * w[:, None]
    w_bts = mask[:, :, None] * mask[:, None, :] * w_bt[:, :, None]
    pairs = [(0, 0), (1, 2), (2, 4)]
    hidden = sum((((hidden_s[m] - hidden_t[t]) ** 2).sum(-1) * w_bt).sum() for m, t in pairs) / (w_bt.sum() * width)
    attention = sum((((scores_s[m - 1] - scores_t[t - 1]) ** 2) * w_bts[:, None]).sum() for m, t in pairs[1:])
    attention = attention / (w_bts.sum() * 4)
    loss = (torch_kd(logits, t_logits, torch.tensor(batch.labels).long(), w, o.alpha, o.temperature)
            + o.hidden_weight * hidden + o.attention_weight * attention)
    loss.backward()
    mine.teacher = teacher
    for name, module in extra.items():
        setattr(mine, name, module)
    try:
        check_objective(tiny_bert_pair, intermediate(o), loss, batch, beside=tuple(extra))
    finally:
        for name in ("teacher", *extra):
            delattr(mine, name)
        if extra:
            del theirs.distill_projection


def test_tinybert_refuses_what_it_cannot_compare(tiny_bert_pair, tmp_path):
    import transformers
    from helpers import randomize_

    from research.objectives.distillation import IntermediateOptions, intermediate, projection_for

    _, mine = tiny_bert_pair
    cfg = transformers.BertConfig(vocab_size=83, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                  intermediate_size=40, num_labels=3)
    randomize_(transformers.BertForSequenceClassification(cfg), seed=7).save_pretrained(tmp_path)
    teacher = from_pretrained(tmp_path, "sequence_classification")
    with pytest.raises(ConfigError, match="the student has 4 attention heads, the teacher 6"):
        projection_for(IntermediateOptions(), mine, teacher, 0)
    with pytest.raises(ConfigError, match="the student is 32 wide, the teacher 48"):
        projection_for(IntermediateOptions(projection="none", attention_weight=0.0), mine, teacher, 0)
    assert projection_for(IntermediateOptions(attention_weight=0.0), mine, teacher, 0)  # hidden states alone: fine
    with pytest.raises(ConfigError, match="'learned' \\(TinyBERT's W_h\\) or 'none'"):
        IntermediateOptions(projection="identity")
    mine.teacher = teacher
    try:  # a learned projection asked for but not attached (the runner attaches it)
        with pytest.raises(ConfigError, match="lacks `distill_projection`"):
            intermediate(IntermediateOptions())(mine, tiny_batch(), KEY)
    finally:
        del mine.teacher


def test_tinybert_on_packed_rows_equals_padded(tmp_path, teacher_dir):
    # The same examples packed several to a row: the same loss (token weights follow each example).
    from research.data.batches import collate, pack
    from research.objectives.distillation import IntermediateOptions, intermediate

    cfg = kd_config(teacher_dir, tmp_path, "objective.name=tinybert", "distill.in_step=true", "data.pack_length=32")
    pieces = experiment.prepare(cfg)
    model = pieces.model
    model.teacher = teacher_lib.frozen(from_pretrained(teacher_dir, "sequence_classification", layers=(0, 1)))
    indices, weights = np.arange(8), np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32)
    padded = collate(pieces.train, indices, weights, 32, pieces.pad_id)
    packed = pack(pieces.train, indices, weights, 32, pieces.pad_id)
    assert packed.input_ids.shape[0] < 8
    loss_fn = intermediate(IntermediateOptions(layer_map=(2,), projection="none"))  # the student's one layer
    a = loss_fn(model, jax.tree.map(jnp.asarray, padded), KEY)
    b = loss_fn(model, jax.tree.map(jnp.asarray, packed), KEY)
    # kd is the KL between a random student and a random teacher that agree to ~4e-6: a difference of nearly
    # equal float32 log-probabilities (|log p| ~ 0.7), whose rounding is absolute (eps * 0.7 ~ 8e-8 per term),
    # not relative: 4e-9 apart when XLA's optimizations are off (tests/conftest.py), hence the atol.
    for key in ("hidden_mse", "attention_mse", "kd", "ce"):
        atol = 5e-8 if key == "kd" else 0.0  # the others are O(1): relative rounding only
        np.testing.assert_allclose(float(b[1][key]), float(a[1][key]), rtol=1e-5, atol=atol, err_msg=key)
    with pytest.raises(ConfigError, match="set distill.in_step=true"):
        kd_config(teacher_dir, tmp_path, "objective.name=tinybert")


def test_a_student_starts_from_a_run_directorys_layers(tmp_path, monkeypatch):
    # model.name_or_path = a (teacher's) run directory: its best checkpoint, exported once into the cache, is
    # where the student starts; model.layers picks its layers.
    from research.run import run_as_checkpoint, with_run_source

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    short = ("train.max_steps=4", "train.eval_every=4", "checkpoint.every_steps=4")
    two_layers = 'model.overrides={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, ' \
                 '"intermediate_size": 64}'  # the smoke model has one: the student takes the teacher's second
    train(smoke(*short, two_layers, "checkpoint.best_metric=dev/accuracy"), tmp_path / "teacher")
    cfg = smoke(f"model.name_or_path={tmp_path / 'teacher'}", "model.init=pretrained", "model.overrides={}",
                "model.layers=[1]")
    student = experiment.build_model(with_run_source(cfg), ("0", "1"))
    teacher = from_pretrained(run_as_checkpoint(tmp_path / "teacher"), "sequence_classification")
    assert student.config.num_hidden_layers == 1
    np.testing.assert_array_equal(np.asarray(student.bert.layers[0].attention.query.kernel.get_value()),
                                  np.asarray(teacher.bert.layers[1].attention.query.kernel.get_value()))
    # The runner starts from it too, and records the run directory, not the cache.
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=1)), tmp_path / "student")
    recorded = json.loads((tmp_path / "student" / "config.json").read_text())
    assert recorded["model"]["name_or_path"] == str(tmp_path / "teacher")
    assert len(list((tmp_path / "cache" / "research" / "run_exports").iterdir())) == 1  # exported once
