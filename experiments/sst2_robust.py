"""SST-2 robustness study: all-MiniLM-L6-v2 fine-tuned on an 8,000-sentence seeded subset of SST-2 (one epoch,
250 steps, the recipe of sst2_minilm.py otherwise), with the objective chosen on the command line:

    research train experiments/sst2_robust.py --set objective.name='"freelb"' --set train.seed=1 \\
        --workdir runs/robustness/freelb_s1
    research eval runs/robustness/freelb_s1 --attack pgd,char

Objectives: cross_entropy (supervised), fgm, pgd, freelb, smart, vat (research/objectives/adversarial.py).
FGM, PGD and VAT need their radius scaled to MiniLM's embeddings: at the default epsilon of 1 (L2 per
example) FGM and PGD never leave chance; scripts/robustness_table.py sets 0.1 and says why. It runs all six
for 3 seeds, attacks each
final model and writes the README's table; paper_figs/robust_accuracy.py draws robust accuracy against the
attack radius. A subset, because six objectives x three seeds of the full epoch (2,105 steps, up to ~4x the
supervised step) do not fit a 2-core machine. Expected: clean dev accuracy about 0.85-0.87 for supervised
training (README, "Adversarial objectives and robustness evaluation", has the measured table).
"""

import dataclasses
from pathlib import Path

from research.config import ExperimentConfig, load_experiment


def get_config() -> ExperimentConfig:
    full = load_experiment(Path(__file__).with_name("sst2_minilm.py"))  # the recipe
    return dataclasses.replace(
        full,
        name="sst2_robust",
        data=dataclasses.replace(full.data, max_train_examples=8000),
        train=dataclasses.replace(full.train, log_every=25, eval_every=None),  # evaluated once, at the end
        checkpoint=dataclasses.replace(full.checkpoint, every_steps=125, keep=1),
    )
