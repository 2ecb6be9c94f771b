"""Model compression: distillation's teacher (teacher.py); pruning and quantization to come with the same
contracts (masks and scales are state, not parameters)."""
