"""Fine-tuning research codebase: Flax NNX BERT and GPT-2 with Hugging Face checkpoint import/export."""
