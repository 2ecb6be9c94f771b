"""LoRA and prefix tuning against full fine-tuning on GPT-2: CamRest676 response generation from a GPT-2
pretrained on Tiny Shakespeare (GPT-2's own weights are not reachable offline, and PEFT on random weights
would study nothing: the base must have learned something the adapter can steer). One seed, as the issue asks.

    research train experiments/tinyshakespeare_gpt2.py --workdir runs/tinyshakespeare_gpt2   # the base, ~30 min
    research export runs/tinyshakespeare_gpt2 runs/gpt2_shakespeare_base --checkpoint best
    research sweep experiments/peft_gpt2.py --seeds 0            # the record: experiments/results/peft_gpt2/

Recipe: camrest676_gpt2.py's data and schedule (batch 16, AdamW with weight decay 0.1 and betas 0.9/0.95,
warmup 6% then cosine decay, clipping at 1.0, 4 epochs, response perplexity on dev and test at each epoch's
end), from the Shakespeare base instead of random weights (6 layers, 6 heads, 384 wide, 256 positions: room
for the 128-token contexts and a 20-slot prefix). Learning rates: full fine-tuning 2e-4 (a third of the
from-scratch rate, as fine-tuning from a trained base calls for); LoRA r=8, alpha=16 on c_attn (peft's GPT-2
default) at 1e-3; prefix tuning with 20 virtual tokens through the reparameterization MLP at 1e-3.

Expected: full fine-tuning at the lowest response perplexity, LoRA close to it, prefix tuning behind at this
model size; LoRA's and the prefix's steps cheaper than full fine-tuning's. Set against camrest676_gpt2.py's
random-init run (dev 9.34): the Shakespeare base helps only as far as what it learned transfers.

The record keeps dev and test response perplexity (the last evaluation), trained parameters and training
throughput; scripts/bench_peft.py measures step times alone.
"""

import dataclasses
from pathlib import Path

from research.config import ExperimentConfig, ModelConfig, load_experiment_module

RESULTS = "peft_gpt2"  # experiments/results/peft_gpt2/
BASE = "runs/gpt2_shakespeare_base"  # `research export` of tinyshakespeare_gpt2.py's run (module docstring)
CAMREST = load_experiment_module(Path(__file__).with_name("camrest676_gpt2.py"))


def get_config() -> ExperimentConfig:
    """camrest676_gpt2.py's data, schedule and evaluation, from the Shakespeare base at a fine-tuning rate."""
    recipe = CAMREST.get_config()
    return dataclasses.replace(recipe, name="peft_gpt2", model=ModelConfig(name_or_path=BASE, task="causal_lm"),
                               optim=dataclasses.replace(recipe.optim, lr=2e-4))


VARIANTS = {
    "full": {},
    "lora": {"peft.method": "lora", "peft.rank": 8, "peft.alpha": 16.0, "optim.lr": 1e-3},
    "prefix": {"peft.method": "prefix", "peft.num_virtual_tokens": 20, "optim.lr": 1e-3},
}


def summarize(workdir: Path) -> dict:
    import json

    from research.metrics import read_records
    from research.sweep import last_record_with

    final = last_record_with(workdir, "dev/perplexity")
    records = read_records(workdir)
    throughput = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r][1:]  # 1st: compiling
    out = {"dev/perplexity": final["dev/perplexity"], "test/perplexity": final["test/perplexity"],
           "tokens_per_s": sorted(throughput)[len(throughput) // 2]}
    if (workdir / "peft.json").exists():
        out["trained_parameters"] = json.loads((workdir / "peft.json").read_text())["trained_parameters"]
    return out


def table(results: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "dev response perplexity", "test response perplexity", "trained parameters", "tokens/s"]
    return header, [[name, f"{rs[0]['dev/perplexity']:.2f}", f"{rs[0]['test/perplexity']:.2f}",
                     f"{rs[0]['trained_parameters']:,}" if "trained_parameters" in rs[0] else "all",
                     f"{rs[0]['tokens_per_s']:.0f}"] for name, rs in results.items()]
