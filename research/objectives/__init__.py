"""Fine-tuning objectives: pure functions `loss_fn(model, batch, rng) -> (loss, aux)`.

`OBJECTIVES` maps a config name to (options dataclass, builder); `make_objective` checks the config's
`params` against the options, so a misspelt hyper-parameter fails before anything compiles."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from research.config import ConfigError, ObjectiveConfig, from_dict
from research.objectives import adversarial, supervised

OBJECTIVES: dict[str, tuple[type, Callable]] = {
    "cross_entropy": (supervised.CrossEntropyOptions, supervised.cross_entropy),
    "fgm": (adversarial.FGMOptions, adversarial.fgm),
    "pgd": (adversarial.PGDOptions, adversarial.pgd),
    "freelb": (adversarial.FreeLBOptions, adversarial.freelb),
    "smart": (adversarial.SMARTOptions, adversarial.smart),
    "vat": (adversarial.VATOptions, adversarial.vat),
}


def make_objective(cfg: ObjectiveConfig) -> Callable:
    if cfg.name not in OBJECTIVES:
        raise ConfigError(f"objective.name={cfg.name!r} is not known; choose from {sorted(OBJECTIVES)}")
    options_cls, build = OBJECTIVES[cfg.name]
    return build(from_dict(options_cls, cfg.params, "objective.params."))


def objective_options(cfg: ObjectiveConfig) -> dict:
    """The objective's options with defaults filled in (what gets saved in the run's config.json)."""
    options_cls, _ = OBJECTIVES[cfg.name]
    return dataclasses.asdict(from_dict(options_cls, cfg.params, "objective.params."))
