"""Objectives that carry state from step to step.

Most objectives are pure `loss_fn(model, batch, rng) -> (loss, aux)`. A few need something that outlives a
step: SMART's Bregman proximal point keeps a momentum (mean-teacher) copy of the parameters, Group DRO keeps
online group weights. Such an objective is a `StatefulObjective`; the train step keeps its state in the train
state (so it is donated, sharded like the parameters, checkpointed and resumed with everything else) and
hands it to the loss, which returns the next one. The train step does not know what the state means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class StatefulObjective:
    # (model, batch, rng, state) -> (loss, aux, new_state). new_state has the structure and dtypes of state;
    # with gradient accumulation the step keeps the weighted mean of its micro-batches' new states, as it
    # does for gradients (so states must be floating point).
    loss: Callable[..., tuple[Any, dict, Any]]
    init_state: Callable[[dict], Any]  # (float32 parameters, a pure dict) -> the state before the first step
