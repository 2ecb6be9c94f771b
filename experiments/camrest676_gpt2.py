"""Customer-service response generation: GPT-2 fine-tuned on CamRest676 restaurant-booking dialogues
(research/data/dialogue.py), loss on the system responses only.

    research train experiments/camrest676_gpt2.py --workdir runs/camrest676_gpt2
    research generate runs/camrest676_gpt2 --prompt $'User: I want a cheap restaurant in the north.\\nSystem:'
    # with the real GPT-2 weights in the HF cache:
    research train experiments/camrest676_gpt2.py --set model.name_or_path='"gpt2"' \\
        --set model.init='"pretrained"' --set model.model_type=null --set 'model.overrides={}' \\
        --set optim.lr=5e-5 --workdir runs/camrest676_gpt2_pretrained

Data: dialog/camrest676/CamRest676.json under the data root, 676 dialogues split 3:1:1 in file order (406 /
135 / 135 dialogues, Sequicity's convention); one example per system turn, the dialogue so far as context
("User: ...\\nSystem: ...\\n" turns, the most recent that fit 128 tokens: median example 89 tokens, 95th
percentile 124; a 256 budget moves the median to 94 but doubles the padded width of most batches) and the
response plus <|endoftext|> as the only targets.

Model and recipe: offline, a GPT-2 with random weights (6 layers, 6 heads, 384 wide, 192 positions: room for
a 128-token context and a 64-token sampled answer) and GPT-2's tokenizer from tokenizers/gpt2; batch 16, AdamW
lr 6e-4 (weight decay 0.1, betas 0.9/0.95), warmup 6% then cosine decay, clipping at 1.0, 4 epochs (420
steps, sized for a 2-core CPU). Dev response perplexity every epoch (the last checkpoint is reported, and
test is scored beside dev), and greedy answers to the first 4 dev contexts next to their references in
TensorBoard (text, "samples") and in <run>/samples.jsonl.

Expected: response perplexity on dev and test around 5-15 for the random-init model (CamRest676 responses
are templated: "X is a nice place in the Y of town serving Z food"), with samples that name slots in the
right places but not always the right restaurant (there is no database lookup). Measured (seed 0, 2-core
CPU, 34 min): dev 9.34, test 8.19 (experiments/README.md).
"""

from research.config import CheckpointConfig, DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig

CAMREST = "dialog/camrest676/CamRest676.json"


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="camrest676_gpt2",
        model=ModelConfig(name_or_path="data:tokenizers/gpt2", task="causal_lm", init="scratch", model_type="gpt2",
                          overrides={"n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 192}),
        data=DataConfig(train=CAMREST, dev=CAMREST, test={"test": CAMREST}, lm_format="camrest676", max_length=128,
                        buckets=(64, 96, 128)),
        optim=OptimConfig(lr=6e-4, weight_decay=0.1, b2=0.95, warmup_ratio=0.06, schedule="cosine", clip_norm=1.0),
        train=TrainConfig(seed=0, batch_size=16, epochs=4.0, log_every=20, eval_every=None, eval_batch_size=32,
                          sample_dev_examples=4, sample_tokens=64),
        checkpoint=CheckpointConfig(every_steps=200, keep=1, best_metric="dev/perplexity", best_mode="min"),
    )
