"""GLUE MRPC (paraphrase, sentence pairs) with all-MiniLM-L6-v2: full fine-tuning, LoRA and Pfeiffer adapters
(research/data/glue.py reads the files as GLUE ships them: the header's byte-order mark, untokenized text).

    research train experiments/glue_mrpc.py --workdir runs/glue_mrpc                 # full fine-tuning, seed 0
    research sweep experiments/glue_mrpc.py --seeds 0 1 2    # the record: experiments/results/glue_mrpc/

Recipe: glue_cola.py's (BERT's GLUE recipe at this model's rate: batch 32, AdamW 5e-5, weight decay 0.01,
warmup 6% then linear decay, clipping at 1.0), with the two sentences as one input (token types 0 and 1) and
5 epochs (575 steps) instead of 3: with 3,668 pairs, BERT-base's 3 epochs are 345 steps, and small GLUE tasks
gain from more (RoBERTa fine-tunes them for 10; Liu et al. 2019). Max length 128 (the longest pair is 103
tokens: none truncated), batches packed into rows of 128 (pairs average 53 tokens). Dev (408 pairs) scored by
F1 of the paraphrase class and accuracy after every epoch; the best checkpoint by F1. The PEFT variants:
glue_cola.py's.

Expected: BERT-base reaches F1 88.9 on MRPC's test set, RoBERTa-base 90.2 accuracy on dev (LoRA paper); a
22M-parameter MiniLM below that, around F1 0.85-0.89 for full fine-tuning. Measured:
experiments/results/glue/README.md.
"""

import dataclasses
from pathlib import Path

from research.config import ExperimentConfig, TrainConfig, load_experiment_module
from research.data.glue import glue_data, run_summary

RESULTS = "glue_mrpc"  # experiments/results/glue_mrpc/
COLA = load_experiment_module(Path(__file__).with_name("glue_cola.py"))
VARIANTS = COLA.VARIANTS


def get_config() -> ExperimentConfig:
    recipe = COLA.get_config()
    return dataclasses.replace(
        recipe, name="glue_mrpc",
        data=glue_data("mrpc", max_length=128, buckets=(32, 64, 96, 128), pack_length=128),
        train=TrainConfig(seed=0, batch_size=32, epochs=5.0, log_every=25, eval_batch_size=128),
        checkpoint=dataclasses.replace(recipe.checkpoint, best_metric="dev/f1"),
    )


def summarize(workdir: Path) -> dict:
    """GLUE's metrics (last and best evaluation) and training throughput."""
    return run_summary(workdir, "mrpc")
