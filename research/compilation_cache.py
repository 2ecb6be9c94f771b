"""The persistent XLA compilation cache of every `research` command.

A run compiles its train step once per batch shape and its evaluation once per bucket; on the 2-core machine
that is a minute or more of every short run (the README's main job: 1.5 of its 3.8 minutes). With the cache
on, XLA's executable for a program it has compiled before (same computation, shapes, compiler version and
flags: the numbers cannot change) is loaded from disk instead: the second run of a job, every seed of a
sweep after the first, `research eval` after training. Tracing still happens; only compilation is skipped.

Where: `$RESEARCH_COMPILATION_CACHE` (a directory, or `off` to switch it off), else JAX's own
`$JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/research/xla` (`~/.cache/research/xla`). One directory
shared by every run: it is bounded (least recently used entries go past `MAX_BYTES`), and bounding turns on
JAX's file lock around every read and write, so concurrent runs (a sweep beside an evaluation) never see an
entry half written.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "RESEARCH_COMPILATION_CACHE"
MAX_BYTES = 4 * 2**30  # a step of BERT-base is ~10 MB; MiniLM's ~2 MB
MIN_COMPILE_SECONDS = 0.2  # JAX's default (1 s) would leave out the small eval programs of short runs
OFF = {"off", "0", "false", "no", "none"}


def cache_dir() -> Path | None:
    """The directory the settings name (module docstring), or None when switched off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "research" / "xla"


def configure() -> Path | None:
    """Turn the cache on for this process (before anything compiles); returns its directory, or None."""
    directory = cache_dir()
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # JAX's own variables, where set, win (the tests cache every program: JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0).
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory
