"""PEFT in the runner (research/peft/ through research train / eval / export), on a small pretrained BERT with
MiniLM's tokenizer: what trains and what a checkpoint holds, exact resume, gradient accumulation, 8 simulated
devices with FSDP, an adversarial objective, bf16 compute, the exports PyTorch loads, and a changed base
refused."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import peft as torch_peft
import pytest
import torch
import transformers
from helpers import params_of, randomize_, records, run_on_one_and_eight_devices, smoke
from safetensors.numpy import load_file, save_file

from research import peft
from research.run import RunError, evaluate_run, export_run, load_trained_model
from research.train import train

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
NO_DROPOUT = ["model.overrides.hidden_dropout_prob=0", "model.overrides.attention_probs_dropout_prob=0"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, minilm_dir):
    """A pretrained-looking base: a 1-layer, 32-wide BertModel with random weights as transformers saves it, and
    MiniLM's tokenizer beside it. No classifier: the run's head is new, as on a real base."""
    path = tmp_path_factory.mktemp("tiny_base")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    randomize_(transformers.BertModel(cfg), seed=3).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, path / name)
    return path


def lora(base, *more):
    return smoke(f"model.name_or_path={base}", "model.init=pretrained", "model.overrides={}", "peft.method=lora",
                 "peft.rank=4", "peft.alpha=16", *more)


def sizes(directory):
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_lora_run_trains_the_adapters_alone_and_resumes_exactly(tmp_path, tiny_base, data_dir):
    workdir = tmp_path / "lora"
    train(lora(tiny_base), workdir)
    described = json.loads((workdir / "peft.json").read_text())
    assert described["layers"] == [f"bert.encoder.layer.0.attention.self.{m}" for m in ("query", "value")]
    assert described["modules_to_save"] == ["classifier"]
    assert described["trained_parameters"] == 2 * (32 * 4 + 4 * 32) + (32 * 2 + 2)  # 2 x (A, B) + the classifier

    # The checkpoints hold the trained parameters and their Adam moments (13 KB; Orbax's metadata makes the rest,
    # 90-105 KB as its OCDBT files land: some data files appear twice, under d/ and ocdbt.process_0/d/), nothing
    # of the frozen 1M (4 MB).
    assert sizes(workdir / "checkpoints" / "16") < 150_000 < sizes(tiny_base) / 25
    step, params = params_of(workdir)
    assert step == 16 and all("lora" in name or name.startswith("classifier") for name in params)
    assert all(np.abs(v).max() > 0 for name, v in params.items() if "lora_b" in name)  # B left zero: it trained

    # Frozen weights unchanged: the restored model's frozen base is the base file's.
    model, _, _ = load_trained_model(workdir, "latest")
    assert peft.fingerprint(model) == described["base_fingerprint"]
    base = load_file(tiny_base / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(model.bert.layers[0].attention.query.kernel.get_value()),
                                  base["encoder.layer.0.attention.self.query.weight"].T)

    # Resuming from step 12 (smoke keeps the last two checkpoints) redoes steps 13-16 bit for bit.
    before = [r for r in records(workdir) if "train/loss" in r]
    train(lora(tiny_base), workdir, resume=True, resume_step=12)
    after = [r for r in records(workdir) if "train/loss" in r]
    assert [r["train/loss"] for r in after] == [r["train/loss"] for r in before]
    _, resumed = params_of(workdir)
    for name in params:
        np.testing.assert_array_equal(resumed[name], params[name], err_msg=name)


def test_exports_load_in_peft_and_transformers_and_another_base_is_refused(tmp_path, tiny_base, data_dir):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    workdir = tmp_path / "lora"
    train(lora(base, "train.max_steps=4", "train.eval_every=null"), workdir)
    model, _, _ = load_trained_model(workdir, "best")
    ids = np.random.RandomState(0).randint(1000, 20000, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))

    def torch_logits(m):
        return m.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()

    export_run(workdir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    loaded = torch_peft.PeftModel.from_pretrained(
        transformers.BertForSequenceClassification.from_pretrained(base, num_labels=2), tmp_path / "adapter")
    np.testing.assert_allclose(torch_logits(loaded), ours, rtol=0, atol=1e-5 * np.abs(ours).max())
    export_run(workdir, tmp_path / "merged", merged=True)
    merged = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(torch_logits(merged), ours, rtol=0, atol=1e-5 * np.abs(ours).max())

    # Another base under the same path: the checkpoints (trained parameters alone) no longer fit, and say so.
    weights = load_file(base / "model.safetensors")
    weights["encoder.layer.0.output.dense.weight"] = weights["encoder.layer.0.output.dense.weight"] * 1.01
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RunError, match="frozen base weights .* differ from the ones"):
        train(lora(base, "train.max_steps=4", "train.eval_every=null"), workdir, resume=True)
    with pytest.raises(RunError, match="frozen base weights .* differ from the ones"):
        evaluate_run(workdir)
    # ... and an exported adapter carries the fingerprint: peft.init_from refuses it on this base too.
    with pytest.raises(peft.PeftError, match="trained on another base model"):
        train(lora(base, f"peft.init_from={tmp_path / 'adapter'}"), tmp_path / "other")


def test_accumulation_objective_and_bfloat16_under_lora(tmp_path, tiny_base, data_dir):
    short = ["train.max_steps=3", "train.eval_every=null", "train.log_every=1", *NO_DROPOUT]
    train(lora(tiny_base, *short), tmp_path / "full")
    train(lora(tiny_base, *short, "train.grad_accum=4"), tmp_path / "accum")
    full = [r["train/loss"] for r in records(tmp_path / "full") if "train/loss" in r]
    accum = [r["train/loss"] for r in records(tmp_path / "accum") if "train/loss" in r]
    np.testing.assert_allclose(accum, full, rtol=1e-5)
    _, a = params_of(tmp_path / "full")
    _, b = params_of(tmp_path / "accum")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)

    # FreeLB perturbs the (frozen) word embeddings; its gradient reaches the adapters only.
    train(lora(tiny_base, *short, "objective.name=freelb"), tmp_path / "freelb")
    losses = [r["train/loss"] for r in records(tmp_path / "freelb") if "train/loss" in r]
    assert len(losses) == 3 and np.isfinite(losses).all() and losses != full
    train(lora(tiny_base, *short, "train.compute_dtype=bfloat16"), tmp_path / "bf16")
    bf16 = [r["train/loss"] for r in records(tmp_path / "bf16") if "train/loss" in r]
    np.testing.assert_allclose(bf16, full, atol=2e-2)
    assert bf16 != full


def test_lora_on_eight_simulated_devices_and_fsdp_matches_one(tmp_path, data_dir):
    one, eight, fsdp = run_on_one_and_eight_devices(tmp_path, "peft.method=lora", "peft.rank=4", fsdp=True)
    assert one["embedding"] is None  # frozen: not among the trained parameters FSDP shards
    assert set(one["params"]) == {n for n in one["params"] if "lora" in n or n.startswith("classifier")}
    for run in (eight, fsdp):
        np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-5)
        for name in one["params"]:
            np.testing.assert_allclose(run["params"][name], one["params"][name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_adalora_run_logs_the_ranks_it_keeps_and_resumes_exactly(tmp_path, tiny_base, data_dir):
    workdir = tmp_path / "adalora"
    cfg = ["peft.method=adalora", "peft.init_rank=6", "peft.rank=2", "peft.tinit=2", "peft.tfinal=4",
           "train.eval_every=null"]
    train(lora(tiny_base, *cfg), workdir)
    ranks = {r["step"]: r for r in records(workdir) if "peft/rank_total" in r}
    assert ranks[2]["peft/rank_total"] == 12  # 2 matrices x init_rank 6, before tinit
    assert ranks[16]["peft/rank_total"] == 4  # x target rank 2, fixed from step 12 (16 - tfinal) on
    assert sum(v for k, v in ranks[16].items() if k.startswith("peft/rank/")) == 4
    assert [r["peft/rank_total"] for r in ranks.values()] == sorted((r["peft/rank_total"] for r in ranks.values()),
                                                                     reverse=True)
    penalty = [r["train/peft_penalty"] for r in records(workdir) if "train/peft_penalty" in r]
    assert len(penalty) == 8 and all(p > 0 for p in penalty)  # the orthogonality regularizer, logged
    _, params = params_of(workdir)
    for name, e in params.items():  # the pruned triplets' singular values are exactly zero, 2 kept on average
        if name.endswith("lora_e"):
            assert (e == 0).sum() >= 1
    assert sum(int((e != 0).sum()) for n, e in params.items() if n.endswith("lora_e")) == 4

    before = [r for r in records(workdir) if "train/loss" in r]
    train(lora(tiny_base, *cfg), workdir, resume=True, resume_step=12)  # the allocator's state resumes too
    after = [r for r in records(workdir) if "train/loss" in r]
    assert [r["train/loss"] for r in after] == [r["train/loss"] for r in before]
    _, resumed = params_of(workdir)
    for name in params:
        np.testing.assert_array_equal(resumed[name], params[name], err_msg=name)


def test_gpt2_prefix_run_samples_and_generates_through_the_cache(tiny_gpt2_dir, tmp_path, data_dir, capsys):
    """A causal-LM run with prefix tuning: greedy samples at the evaluation (the prefix in the KV cache), and
    `research generate` from the run directory continues the prompts the same way."""
    import dataclasses

    from research.cli import main
    from research.config import DataConfig, ExperimentConfig, ModelConfig, PeftConfig, TrainConfig

    path = tmp_path / "text.txt"
    path.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:8000])
    cfg = ExperimentConfig(
        name="lm_prefix", model=ModelConfig(name_or_path=str(tiny_gpt2_dir), task="causal_lm"),
        data=DataConfig(train=str(path), dev=str(path), holdout_fraction=0.25, max_length=32, buckets=(16, 32)),
        peft=PeftConfig(method="prefix", num_virtual_tokens=4),
        train=TrainConfig(batch_size=8, max_steps=2, log_every=1, eval_batch_size=16, sample_prompts=("ROMEO:",),
                          sample_tokens=6))
    train(cfg, tmp_path / "run")
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["ROMEO:"]
    capsys.readouterr()
    main(["generate", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max-new-tokens", "6", "--checkpoint", "latest"])
    assert f"ROMEO:{samples[0]['text']}" in capsys.readouterr().out

    # Prompt tuning, computing in bfloat16 over float32 master weights, initialized from a text's tokens.
    prompt = dataclasses.replace(cfg, peft=PeftConfig(method="prompt", num_virtual_tokens=4, prompt_init="text",
                                                      prompt_init_text="Speak:"),
                                 train=dataclasses.replace(cfg.train, compute_dtype="bfloat16"))
    final = train(prompt, tmp_path / "prompt")
    assert np.isfinite(final["dev/perplexity"])
    _, params = params_of(tmp_path / "prompt")
    assert set(params) == {"transformer/prompt/embedding"}  # causal LM: no head to train beside it
    assert params["transformer/prompt/embedding"].dtype == np.float32
