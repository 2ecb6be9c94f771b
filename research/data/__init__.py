"""Data pipelines, one module per task format. `classification`: text (or text pair) -> label."""
