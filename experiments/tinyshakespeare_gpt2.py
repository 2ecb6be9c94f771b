"""Causal language modelling on Tiny Shakespeare with a small GPT-2 trained from scratch (research/data/lm.py).

    research train experiments/tinyshakespeare_gpt2.py --workdir runs/tinyshakespeare_gpt2
    research generate runs/tinyshakespeare_gpt2 --prompt "ROMEO:" --max-new-tokens 64

Data: tinyshakespeare/input.txt under the data root, one document; the first 90% of its characters train and
the last 10% validate (nanoGPT's split, `data.holdout_fraction=0.1`). GPT-2's BPE tokenizer (from
tokenizers/gpt2 in the data root); windows of 256 tokens, every token but the first predicted exactly once.

Model and recipe: GPT-2 with random weights, 6 layers, 6 heads, 384 wide, 256 positions (~30M parameters, 19M
of them the tied 50,257-token embedding), dropout 0.1; batch 16 windows, AdamW lr 6e-4 (weight decay 0.1,
betas 0.9/0.95, as nanoGPT), linear warmup over 6% then cosine decay, clipping at 1.0, 2 epochs (~150
steps of 4,096 tokens; sized for a 2-core CPU, where a step takes several seconds: the 50,257-way output
layer costs more than the six blocks). Validation perplexity every 25 steps.

Expected: validation perplexity falls from ~50,000 (a uniform guess over the vocabulary) to a few hundred
within the first epoch and lower after the second; measured (seed 0, 2-core CPU, 29 min): 626 after 25
steps, 345.0 after 150 (2.73 bits per byte). More epochs keep improving it. Word-piece perplexity on 10%
of a 1 MB corpus is not comparable with character-level Tiny Shakespeare numbers.
"""

from research.config import CheckpointConfig, DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="tinyshakespeare_gpt2",
        model=ModelConfig(name_or_path="data:tokenizers/gpt2", task="causal_lm", init="scratch", model_type="gpt2",
                          overrides={"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 256}),
        data=DataConfig(train="tinyshakespeare/input.txt", dev="tinyshakespeare/input.txt", holdout_fraction=0.1,
                        max_length=256, buckets=(64, 128, 192, 256)),
        optim=OptimConfig(lr=6e-4, weight_decay=0.1, b2=0.95, warmup_ratio=0.06, schedule="cosine", clip_norm=1.0),
        train=TrainConfig(seed=0, batch_size=16, epochs=2.0, log_every=10, eval_every=25, eval_batch_size=32),
        checkpoint=CheckpointConfig(every_steps=100, keep=1, best_metric="dev/perplexity", best_mode="min"),
    )
