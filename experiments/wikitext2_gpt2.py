"""WikiText-2 perplexity of a GPT-2 checkpoint, no training: the number to set beside published ones.

    research eval experiments/wikitext2_gpt2.py                                  # "gpt2" from the HF cache
    research eval experiments/wikitext2_gpt2.py --set model.name_or_path='"/path/to/gpt2"' \\
        --out runs/wikitext2_gpt2.json
    HF_HUB_OFFLINE=1 research eval experiments/wikitext2_gpt2.py     # the cache only, no network

Protocol (exactly what is computed):
- Text: wikitext2/wiki.valid.raw (dev) and wikitext2/wiki.test.raw (test) from the data root, the raw files
  byte for byte: no detokenization, no joining of lines, one document per file with <|endoftext|> appended
  (the only token added).
- Tokenization: GPT-2's BPE from the checkpoint's own tokenizer files: 249,888 tokens for validation and
  286,222 for test, <|endoftext|> included (213,886 and 241,211 whitespace words; 1,146,846 and 1,290,590
  bytes).
- Windows: context 1024 tokens (GPT-2's n_positions), stride 512: window k covers tokens [512k, 512k + 1024)
  and predicts only the tokens no earlier window predicted, so every token but the first is predicted exactly
  once and, after the first window, with at least 511 tokens of context (the sliding-window protocol of
  transformers' perplexity guide, summed per token rather than averaged per window).
- Reported: token-level perplexity exp(mean NLL per predicted BPE token), and from the same total NLL the
  word-level perplexity (per whitespace-separated word of the raw file) and bits per byte (UTF-8), which do
  not depend on the tokenizer.
- Not comparable as is: the GPT-2 paper's WikiText-2 numbers (29.41 for the 117M model) are word-level on
  detokenized text, and lm-evaluation-harness evaluates detokenized articles one document at a time;
  transformers' guide joins the dataset's lines with blank lines, which changes the text slightly. State the
  protocol next to any number you compare.

Expected for the real `gpt2` (124M) weights: token-level test perplexity in the mid-20s with this protocol.
The real weights are not in this repository's offline CI; tests/test_lm.py checks the computation against
transformers on a random GPT-2 instead.
"""

from research.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="wikitext2_gpt2",
        model=ModelConfig(name_or_path="gpt2", task="causal_lm"),
        data=DataConfig(train="wikitext2/wiki.valid.raw", dev="wikitext2/wiki.valid.raw",
                        test={"test": "wikitext2/wiki.test.raw"}, max_length=1024, buckets=(1024,), eval_stride=512),
        train=TrainConfig(eval_batch_size=8),
    )
