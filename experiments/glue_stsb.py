"""GLUE STS-B (semantic similarity, a 0-5 score per sentence pair) with all-MiniLM-L6-v2: a regression head
trained with mean-squared error (model.problem_type="regression"), by full fine-tuning, LoRA and Pfeiffer
adapters.

    research train experiments/glue_stsb.py --workdir runs/glue_stsb                 # full fine-tuning, seed 0
    research sweep experiments/glue_stsb.py --seeds 0 1 2    # the record: experiments/results/glue_stsb/

Recipe: glue_mrpc.py's (glue_cola.py's rate and schedule, sentence pairs, 5 epochs: 900 steps over 5,749
pairs, max length 128: the longest pair is 125 tokens, none truncated; rows of 128). The head is one linear
output on the pooler, as transformers' `BertForSequenceClassification` with `problem_type="regression"` (the
export loads as one). Dev (1,500 pairs) scored by Pearson and Spearman correlation after every epoch (scipy's);
the best checkpoint by Pearson. The PEFT variants: glue_cola.py's.

Expected: all-MiniLM-L6-v2 was trained on sentence-similarity pairs, so this is its home ground: Pearson
around 0.85-0.88 for full fine-tuning (BERT-base 87.1 Spearman on test, RoBERTa-base 91.2 Pearson on dev in
the LoRA paper), and the PEFT variants close to it. Measured: experiments/results/glue/README.md.
"""

import dataclasses
from pathlib import Path

from research.config import ExperimentConfig, load_experiment_module
from research.data.glue import glue_data, run_summary

RESULTS = "glue_stsb"  # experiments/results/glue_stsb/
MRPC = load_experiment_module(Path(__file__).with_name("glue_mrpc.py"))
VARIANTS = MRPC.VARIANTS


def get_config() -> ExperimentConfig:
    recipe = MRPC.get_config()
    return dataclasses.replace(
        recipe, name="glue_stsb",
        model=dataclasses.replace(recipe.model, problem_type="regression"),
        data=glue_data("stsb", max_length=128, buckets=(32, 64, 96, 128), pack_length=128),
        checkpoint=dataclasses.replace(recipe.checkpoint, best_metric="dev/pearson"),
    )


def summarize(workdir: Path) -> dict:
    """GLUE's metrics (last and best evaluation) and training throughput."""
    return run_summary(workdir, "stsb")
