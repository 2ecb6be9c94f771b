"""The `research demo` job on the real MiniLM weights, and config behaviour: HF round trip, hashability
(configs are static under jit), validation."""

import dataclasses
import os
import platform
import subprocess
import sys

import pytest
from helpers import SMOKE

from research.cli import DEMO_CANDIDATES, main
from research.models import from_config
from research.models.bert import PRESETS as BERT_PRESETS
from research.models.bert import BertConfig
from research.models.gpt2 import PRESETS as GPT2_PRESETS
from research.models.gpt2 import GPT2Config


def test_demo_predicts_the_refund_sentence(capsys):
    main(["demo"])
    out = capsys.readouterr().out
    assert f"prediction: {DEMO_CANDIDATES[0]}" in out  # the only on-topic candidate


# research.launch with research.cli replaced by a module whose main reports the environment and the PID. A
# stand-in in sys.modules, not the real module patched: importing research.cli (JAX, Flax, Orbax) would cost
# each start seconds, and the launcher's re-execution is the subject, not the CLI.
LAUNCH = ("import os, sys, types; print('start', os.getpid(), flush=True); "
          "cli = sys.modules['research.cli'] = types.ModuleType('research.cli'); "
          "cli.main = lambda: print('cli', os.getpid(), os.environ.get('GLIBC_TUNABLES')); "
          "from research.launch import main; main()")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the huge-page tunable is glibc's")
@pytest.mark.parametrize("env, starts, tunables", [
    ({}, 2, "glibc.malloc.hugetlb=1"),  # re-executed once, tunable added
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, 2, "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, 1, "glibc.malloc.hugetlb=0"),  # the user's choice stands
    ({"RESEARCH_MALLOC_HUGEPAGES": "0"}, 1, "None"),  # opted out
])
def test_the_command_restarts_itself_once_with_huge_pages(env, starts, tunables):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RESEARCH_MALLOC_HUGEPAGES")}
    out = subprocess.run([sys.executable, "-c", LAUNCH], env={**base, **env}, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    pids = {line.split()[1] for line in out if line}
    assert [line.split()[0] for line in out if line] == ["start"] * starts + ["cli"]
    assert len(pids) == 1  # exec: the same process throughout
    assert out[starts].split()[2] == tunables


@pytest.mark.parametrize("cfg", [*BERT_PRESETS.values(), *GPT2_PRESETS.values()])
def test_hf_config_round_trip(cfg):
    again = type(cfg).from_hf_config(cfg.to_hf_config("X"))
    assert again == dataclasses.replace(cfg, id2label=again.id2label)
    hash(cfg)


def test_labels_and_validation():
    cfg = BertConfig.from_hf_config({"id2label": {"1": "pos", "0": "neg"}})
    assert cfg.num_labels == 2 and cfg.labels() == {0: "neg", 1: "pos"}
    hash(cfg)
    with pytest.raises(ValueError, match="not divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="activation_function='swiglu' is not supported"):
        GPT2Config(activation_function="swiglu")
    with pytest.raises(ValueError, match="ids must be 0..1"):
        BertConfig.from_hf_config({"id2label": {"0": "a", "2": "b"}})


def test_from_config_builds_every_task():
    small = dict(vocab_size=20, num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8)
    for task in ("base", "sequence_classification", "token_classification", "masked_lm"):
        assert from_config(BertConfig(**small), task).config.num_hidden_layers == 1
    gpt = GPT2Config(vocab_size=20, n_layer=1, n_embd=8, n_head=2, n_positions=16)
    for task in ("base", "causal_lm", "sequence_classification"):
        assert from_config(gpt, task).config.n_layer == 1
    with pytest.raises(ValueError, match="task 'masked_lm' is not available"):
        from_config(gpt, "masked_lm")


def test_every_command_compiles_through_one_persistent_cache(tmp_path, monkeypatch, data_dir):
    # Where the cache is: RESEARCH_COMPILATION_CACHE (a directory, or off), else JAX's variable, else the
    # user's cache directory.
    from research import compilation_cache

    monkeypatch.setenv(compilation_cache.ENV, "off")
    assert compilation_cache.cache_dir() is None
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "mine"))
    assert compilation_cache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(compilation_cache.ENV)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    assert compilation_cache.cache_dir() == tmp_path / "home" / "research" / "xla"
    # The same command twice (an evaluation of the smoke model: the cheapest that compiles): the first fills the
    # cache, the second compiles nothing new (every program a hit).
    cache = tmp_path / "xla"
    # Every program kept (the suite keeps only those over 0.1 s, and a compile time near it would make the test
    # depend on the machine's load).
    env = {**os.environ, compilation_cache.ENV: str(cache), "RESEARCH_DATA_DIR": str(data_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    entries = []
    for _ in range(2):
        done = subprocess.run(["research", "eval", str(SMOKE), "--set", "data.max_dev_examples=16"], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        entries.append(sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache")))
    assert len(entries[0]) >= 1
    assert entries[1] == entries[0]
