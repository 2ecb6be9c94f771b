"""The batch: what data produces and objectives, the train step, evaluation and the attacks consume.

One typed pytree, so that none of them needs to know which reader made it, and jit, `jax.tree.map` and the
sharding helpers see its arrays as leaves (fields that are None are empty subtrees: a padded batch and a
packed one are two pytree structures, each compiled once).

Rows and examples. A padded batch holds one example per row, so R == E. A packed batch
(`research.data.batches.pack`) holds several examples per row: `segment_ids` keeps attention inside each
example, `position_ids` restart at 0 for each, and `pool_index` says where each example's first token sits.
Per-example fields (`labels` of a sequence task, `weights`, `environment`, `pair_ids`, a sequence task's
`teacher_logits`) have E entries; token fields have the rows' shape (R, T).

On the device the train step sees every field with a leading micro-batch axis, (A, R / A, ...) and
(A, E / A, ...) (`research.sharding.put_batch`); inside the loss, each micro-batch as below.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

Array = Any  # a NumPy array on the host, a jax.Array on the device: the same batch travels through both


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: Array  # (R, T) int32 token ids, padding with the model's pad id
    attention_mask: Array  # (R, T) int32: 1 on real tokens, 0 on padding
    # (E,) int32 class ids of a sequence task (float32 scores for a regression); (R, T) int32 token targets of a
    # token task (tagging, causal LM), a valid index everywhere: `label_weights` says which count.
    labels: Array
    weights: Array  # (E,) float32: 1 for a real example, 0 for a filler row (counts in no loss and no metric)
    # (R, T) int32 segment (sentence A/B) ids; None for families without token types (GPT-2: given zeros it
    # would add the embedding of token 0 to every position).
    token_type_ids: Array | None = None
    position_ids: Array | None = None  # (R, T) int32, packed rows: positions restarting at 0 for each example
    segment_ids: Array | None = None  # (R, T) int32, packed rows: 1, 2, ... per example, 0 on padding
    pool_index: Array | None = None  # (E, 2) int32, packed rows: (row, position) of each example's first token
    label_weights: Array | None = None  # (R, T) float32, token tasks: 1 where a token target counts
    environment: Array | None = None  # (E,) int32 training-environment ids (invariance objectives)
    pair_ids: Array | None = None  # (E,) int32 counterfactual pair of each example; pair p at examples 2p, 2p+1
    # Distillation: the teacher's logits, (E, C) per example, or (R, T, C) per token of a token task (zeros
    # where no target counts); research/compress/teacher.py computes and caches them.
    teacher_logits: Array | None = None

    # The model's keyword arguments (DESIGN.md's calling contract); the rest is for the loss.
    MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "segment_ids", "pool_index")

    def model_inputs(self) -> dict[str, Array]:
        """`model(**batch.model_inputs())`: the inputs the batch has (padded or packed)."""
        return {k: getattr(self, k) for k in self.MODEL_INPUTS if getattr(self, k) is not None}

    def segments(self) -> Array:
        """(R, T) the example number of every token within its row, 0 on padding: the segment ids when packed,
        the attention mask when padded (one example a row)."""
        return self.segment_ids if self.segment_ids is not None else self.attention_mask

    def replace(self, **changes: Array) -> Batch:
        return dataclasses.replace(self, **changes)
