"""Fine-tuning objectives: pure functions `loss_fn(model, batch, rng) -> (loss, aux)` (or `StatefulObjective`).

`OBJECTIVES` maps a config name to (options dataclass, builder); `make_objective` checks the config's
`params` against the options, so a misspelt hyper-parameter fails before anything compiles. The builders of
`ENVIRONMENT_OBJECTIVES` also take the training environments' names (from the data); `PAIR_OBJECTIVES` need
batches of counterfactual pairs. An objective may also train modules of its own beside the model
(`objective_modules`: TinyBERT's projection between widths), which are never part of the model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from research.config import ConfigError, ObjectiveConfig, from_dict
from research.objectives import adversarial, counterfactual, distillation, invariance, supervised

OBJECTIVES: dict[str, tuple[type, Callable]] = {
    "cross_entropy": (supervised.CrossEntropyOptions, supervised.cross_entropy),
    "fgm": (adversarial.FGMOptions, adversarial.fgm),
    "pgd": (adversarial.PGDOptions, adversarial.pgd),
    "freelb": (adversarial.FreeLBOptions, adversarial.freelb),
    "smart": (adversarial.SMARTOptions, adversarial.smart),
    "vat": (adversarial.VATOptions, adversarial.vat),
    "irm": (invariance.IRMOptions, invariance.irm),
    "vrex": (invariance.VRExOptions, invariance.vrex),
    "group_dro": (invariance.GroupDROOptions, invariance.group_dro),
    "clp": (counterfactual.CLPOptions, counterfactual.clp),
    "gradient_supervision": (counterfactual.GradientSupervisionOptions, counterfactual.gradient_supervision),
    "pair_margin": (counterfactual.PairMarginOptions, counterfactual.pair_margin),
    "kd": (distillation.KDOptions, distillation.kd),  # needs distill.teacher (research/compress/teacher.py)
    "tinybert": (distillation.IntermediateOptions, distillation.intermediate),  # and distill.in_step
}
ENVIRONMENT_OBJECTIVES = {"irm", "vrex", "group_dro"}
PAIR_OBJECTIVES = {"clp", "gradient_supervision", "pair_margin"}  # need pair batches (data.pair_column)


def make_objective(cfg: ObjectiveConfig, environments: tuple[str, ...] = ()) -> Callable:
    """The objective `cfg` names; `environments`: the training environments' names, in id order."""
    if cfg.name not in OBJECTIVES:
        raise ConfigError(f"objective.name={cfg.name!r} is not known; choose from {sorted(OBJECTIVES)}")
    options_cls, build = OBJECTIVES[cfg.name]
    options = from_dict(options_cls, cfg.params, "objective.params.")
    if cfg.name not in ENVIRONMENT_OBJECTIVES:
        return build(options)
    if len(environments) < 2:
        raise ConfigError(f"objective.name={cfg.name!r} compares training environments, and the data has "
                          f"{len(environments) or 'no'} environment(s): set data.environment_column, "
                          "data.environment_files, data.pair_environments or data.spurious")
    return build(options, environments)


def objective_options(cfg: ObjectiveConfig) -> dict:
    """The objective's options with defaults filled in (what gets saved in the run's config.json)."""
    options_cls, _ = OBJECTIVES[cfg.name]
    return dataclasses.asdict(from_dict(options_cls, cfg.params, "objective.params."))


def objective_modules(cfg: ObjectiveConfig, model: nnx.Module, teacher: nnx.Module | None, seed: int
                      ) -> dict[str, nnx.Module]:
    """Modules the objective trains beside `model`, by the attribute the loss finds them under on the train
    model: TinyBERT's learned projection; none for the others. research/train.py attaches them to the train
    model only and keeps their parameters in the train state ("objective_params"): optimized with the model's,
    checkpointed and resumed with it, never in the model's parameters, its best checkpoint or its export."""
    if cfg.name != "tinybert" or teacher is None:  # no teacher in the step: the loss says what is missing
        return {}
    options = from_dict(distillation.IntermediateOptions, cfg.params, "objective.params.")
    return distillation.projection_for(options, model, teacher, seed)
