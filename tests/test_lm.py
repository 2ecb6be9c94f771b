"""Causal language modelling (research/data/lm.py): documents joined with end-of-text, windows that predict
every token exactly once (or with a sliding context), perplexity equal to transformers' on the same text
with transformers' own tokenizer, and a GPT-2 trained through the runner."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from research.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from research.data.lm import token_stream, windows
from research.models import from_pretrained


@pytest.mark.parametrize("length, max_length, stride", [(100, 16, 15), (100, 16, 4), (17, 16, 15), (16, 16, 15),
                                                         (5, 16, 8), (2, 8, 1)])
def test_windows_predict_every_token_once(length, max_length, stride):
    """Every stream token but the first is a target exactly once, of the token before it, with at least
    max_length - stride - 1 tokens of context after the first window; nothing is cut off."""
    stream = np.arange(100, 100 + length, dtype=np.int32)
    inputs, targets = windows(stream, max_length, stride)
    predicted = []
    for k, (ids, target) in enumerate(zip(inputs, targets, strict=True)):
        assert len(ids) == len(target) <= max_length and np.array_equal(ids, stream[k * stride : k * stride + len(ids)])
        for t in np.flatnonzero(target >= 0):
            assert target[t] == ids[t + 1]  # the next token
            assert k == 0 or t >= max_length - stride - 1  # the context it is predicted from
            predicted.append(k * stride + t + 1)
    assert predicted == list(range(1, length))


def test_documents_end_with_end_of_text(data_dir):
    from research.models import load_tokenizer

    files = data_dir / "tokenizers" / "gpt2"
    docs = ["Hello world", "ROMEO: hi\n\nJULIET: ho"]
    stream = token_stream(load_tokenizer(files), docs, 50256)
    theirs = transformers.GPT2TokenizerFast.from_pretrained(files)
    assert stream.tolist() == [*theirs(docs[0])["input_ids"], 50256, *theirs(docs[1])["input_ids"], 50256]
    assert stream[:2].tolist() == [15496, 995]  # "Hello", " world"


def lm_config(model_dir, text_file, *, init="pretrained", **data):
    return ExperimentConfig(
        name="lm_test", model=ModelConfig(name_or_path=str(model_dir), task="causal_lm", init=init),
        data=DataConfig(train=str(text_file), dev=str(text_file), max_length=32, buckets=(16, 32), **data),
        train=TrainConfig(batch_size=8, max_steps=2, log_every=1, eval_batch_size=16))


@pytest.mark.parametrize("stride", [31, 8])
def test_perplexity_equals_transformers(tiny_gpt2_dir, data_dir, tmp_path, stride):
    """Our held-out loss on a Shakespeare excerpt (windows of 32, stride 31 or 8) equals the sliding-window
    loop of transformers' perplexity guide run on GPT2LMHeadModel with GPT2TokenizerFast (rtol 1e-5)."""
    from flax import nnx

    from research.evaluate import lm_metrics, make_eval_step
    from research.experiment import prepare
    from research.sharding import make_mesh

    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:3000]
    path = tmp_path / "excerpt.txt"
    path.write_text(text)
    cfg = lm_config(tiny_gpt2_dir, path, eval_stride=stride)
    pieces = prepare(cfg, with_train=False)
    mesh = make_mesh()
    graphdef, params, rest = nnx.split(pieces.model, nnx.Param, ...)
    ours, _ = lm_metrics(make_eval_step(graphdef, rest, mesh, token_sums=True), params, pieces.dev, 16, (16, 32),
                         pieces.pad_id, mesh)

    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(data_dir / "tokenizers" / "gpt2")
    ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):  # the guide's loop, summing instead of averaging windows
        end = min(begin + 32, ids.shape[1])
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - previous_end)] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())  # the model shifts: the first label is never predicted
        nll, count, previous_end = nll + float(loss) * n, count + n, end
        if end == ids.shape[1]:
            break
    assert count == ids.shape[1] - 1
    assert ours["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert ours["perplexity"] == pytest.approx(np.exp(nll / count), rel=1e-5)


def test_gpt2_trains_through_the_runner(tiny_gpt2_dir, data_dir, tmp_path, capsys):
    """Train (with greedy samples of two prompts at the evaluation), evaluate again, and continue prompts
    with `research generate` from the run directory: greedy decoding there equals the training samples."""
    import dataclasses

    from research.cli import main
    from research.run import evaluate_run
    from research.train import train

    path = tmp_path / "text.txt"
    path.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:8000])
    cfg = lm_config(tiny_gpt2_dir, path, init="scratch", holdout_fraction=0.25)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sample_prompts=("ROMEO:", "To be"),
                                                             sample_tokens=6))
    final = train(cfg, tmp_path / "run")
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(2, "ROMEO:"), (2, "To be")]
    capsys.readouterr()
    main(["generate", str(tmp_path / "run"), "--prompt", "ROMEO:", "--prompt", "To be", "--max-new-tokens", "6",
          "--checkpoint", "latest"])
    printed = capsys.readouterr().out
    assert all(f"{s['prompt']}{s['text']}" in printed for s in samples), printed
    assert final["dev/perplexity"] == pytest.approx(np.exp(final["dev/loss"]), rel=1e-6)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["dev"]["label_counts"]["targets"] == report["dev"]["label_counts"]["tokens"] - 1
    again, text = evaluate_run(tmp_path / "run", "latest")
    assert again["eval_latest/perplexity"] == pytest.approx(final["dev/perplexity"], rel=1e-5)
    assert "perplexity" in text
    with pytest.raises(ConfigError, match="causal_lm.*unset data.labels"):
        lm_config(tiny_gpt2_dir, path, labels=("a", "b"))


def test_eval_of_an_experiment_file_scores_an_untrained_checkpoint(tiny_gpt2_dir, data_dir, tmp_path, capsys):
    """`research eval experiments/wikitext2_gpt2.py --set model.name_or_path=...`: the checkpoint as it is, on
    dev and test, with word perplexity and bits per byte from the same total log-likelihood."""
    from pathlib import Path

    from research.cli import main

    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text()[:4000]
    (tmp_path / "excerpt.raw").write_text(text)
    out = tmp_path / "ppl.json"
    experiment = Path(__file__).resolve().parents[1] / "experiments" / "wikitext2_gpt2.py"
    excerpt = tmp_path / "excerpt.raw"
    main(["eval", str(experiment), "--set", f'model.name_or_path="{tiny_gpt2_dir}"', "--set", "data.max_length=64",
          "--set", "data.buckets=[64]", "--set", "data.eval_stride=32", "--set", f'data.dev="{excerpt}"',
          "--set", f'data.test={{"test": "{excerpt}"}}', "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["dev/perplexity"] == metrics["test/perplexity"] > 1000  # random weights, same text
    nll = metrics["dev/loss"] * (len(np.asarray(token_stream_of(tiny_gpt2_dir, text))) - 1)
    assert metrics["dev/word_perplexity"] == pytest.approx(np.exp(nll / len(text.split())), rel=1e-5)
    assert metrics["dev/bits_per_byte"] == pytest.approx(nll / len(text.encode()) / np.log(2), rel=1e-5)
    assert "no training" in capsys.readouterr().out


def token_stream_of(model_dir, text):
    from research.models import load_tokenizer

    return token_stream(load_tokenizer(model_dir), [text], 50256)


def test_dialogue_run_writes_response_samples_beside_references(tiny_gpt2_dir, data_dir, tmp_path):
    """A CamRest676 run (data.lm_format="camrest676") reports response perplexity and writes greedy answers
    to the first dev contexts with their reference responses."""
    from research.train import train

    camrest = "dialog/camrest676/CamRest676.json"
    cfg = ExperimentConfig(
        name="dialogue_test", model=ModelConfig(name_or_path=str(tiny_gpt2_dir), task="causal_lm", init="scratch",
                                                overrides={"n_positions": 128}),
        data=DataConfig(train=camrest, dev=camrest, lm_format="camrest676", max_length=96, buckets=(32, 64, 96),
                        max_train_examples=40, max_dev_examples=10),
        train=TrainConfig(batch_size=8, max_steps=1, log_every=1, eval_batch_size=64, sample_dev_examples=2,
                          sample_tokens=4))
    final = train(cfg, tmp_path / "run")
    assert final["dev/perplexity"] > 1000  # one step from random weights
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in samples] == ["There are no mathcing records found for that request",
                                                 "There are no matching records found for that request."]
    assert all(s["prompt"].endswith("System:") for s in samples)


@pytest.mark.parametrize(("chunk", "smoothing"), [(8, 0.0), (1024, 0.1)])
def test_chunked_lm_loss_equals_the_full_logits(tiny_gpt2_dir, chunk, smoothing):
    # The output layer and the cross-entropy `chunk` tokens at a time (8: four chunks for the 30 tokens, the
    # last with 2 padding slots; 1024: one chunk of 30) against the full (B, T, V) logits: loss and accuracy 1e-5,
    # every gradient 1e-4 of its largest entry, on a batch with padding and label smoothing.
    import jax
    from flax import nnx

    from research.batch import Batch
    from research.objectives.supervised import CrossEntropyOptions, cross_entropy

    model = from_pretrained(tiny_gpt2_dir, "causal_lm")
    model.eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, (3, 10)).astype(np.int32)
    mask = np.ones((3, 10), np.int32)
    mask[2, 6:] = 0  # a shorter row, right-padded
    labels = np.concatenate([ids[:, 1:], np.zeros((3, 1), np.int32)], axis=1)
    label_weights = (mask * np.concatenate([mask[:, 1:], np.zeros((3, 1), np.int32)], axis=1)).astype(np.float32)
    batch = jax.tree.map(jnp.asarray, Batch(input_ids=ids, attention_mask=mask, labels=labels,
                                            weights=np.ones(3, np.float32), label_weights=label_weights))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(lm_chunk):
        objective = cross_entropy(CrossEntropyOptions(label_smoothing=smoothing, lm_chunk=lm_chunk))
        return jax.value_and_grad(lambda p: objective(nnx.merge(graphdef, p, rest), batch, None), has_aux=True)(
            params)

    (full_loss, full_aux), full_grads = run(0)
    (loss, aux), grads = run(chunk)
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-5)
    np.testing.assert_allclose(float(aux["accuracy"]), float(full_aux["accuracy"]), rtol=1e-5)
    assert float(aux["weight"]) == float(full_aux["weight"]) == label_weights.sum()
    for (path, g), (_, f) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(full_grads), strict=True):
        g, f = np.asarray(g[...]), np.asarray(f[...])
        np.testing.assert_allclose(g, f, rtol=0, atol=1e-4 * max(np.abs(f).max(), 1e-12), err_msg=str(path))
