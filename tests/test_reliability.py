"""The runner survives faults and refuses what would lose work, on experiments/smoke.py (16 steps, 2 epochs,
checkpoints every 4 steps, keep 2):

- SIGKILL before, during and after a checkpoint's write, one after the other in the same run directory,
  each followed by --resume: the run completes with the uninterrupted run's metrics and final parameters
  (bit for bit); a leftover of a cut save never counts, and the next save of that step replaces it; every
  step appears once in metrics.jsonl and TensorBoard;
- a committed checkpoint with a flipped bit, a truncated or a missing file fails verification naming the
  step and the file; an older checkpoint is used only with --resume-step, and that run completes exactly;
- restoring into another model shape lists every mismatched path;
- a full disk (a file-size limit, so it also works without root) fails the save loudly and the previous
  checkpoint stays and resumes, with keep=1: retention waits for the new checkpoint;
- a second run in a directory in use is refused.
"""

import fcntl
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import SMOKE, deterministic, records, smoke

from research.checkpoint import MANIFEST, Checkpoints, write_manifest
from research.config import apply_overrides
from research.models.hf import CheckpointError
from research.run import RunDirBusyError
from research.train import train


def final_params(workdir):
    from flax import nnx

    from research.run import load_trained_model

    model, step, _ = load_trained_model(Path(workdir), "latest")
    return step, {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_run(a, b):
    assert deterministic(records(a)) == deterministic(records(b))
    step_a, pa = final_params(a)
    step_b, pb = final_params(b)
    assert step_a == step_b == 16
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    train(smoke(), workdir)
    return workdir


# A `research train` child that SIGKILLs itself at one point of the save of one step.
KILL_AT = """
import os, signal, sys
from research import checkpoint
from research.cli import main

where, step_at = sys.argv[1], int(sys.argv[2])
save, manifest, rename = checkpoint.Checkpoints.save, checkpoint.write_manifest, os.rename

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_hook(self, step, state, meta):
    if where == "before" and step == step_at:
        die()  # nothing of this save written yet
    return save(self, step, state, meta)

def rename_hook(src, dst, *args, **kwargs):
    if where == "during" and f"/{step_at}.orbax-checkpoint-tmp" in str(src):
        die()  # Orbax has written into its temporary directory and not yet renamed it into place
    return rename(src, dst, *args, **kwargs)

def manifest_hook(directory):
    if where == "after" and directory.name == str(step_at):
        die()  # Orbax's write is complete and in place; the manifest, our commit, is not written
    return manifest(directory)

checkpoint.Checkpoints.save = save_hook
checkpoint.write_manifest = manifest_hook
os.rename = rename_hook
main(sys.argv[3:])
"""


def run_cli(workdir, *args, prelude=None, hook_args=()):
    code = ["-c", prelude, *hook_args] if prelude else ["-m", "research.cli"]
    return subprocess.run([sys.executable, *code, "train", str(SMOKE), "--workdir", str(workdir), *args],
                          capture_output=True, text=True, timeout=600)


def test_sigkill_before_during_and_after_a_save_then_resume_is_identical(reference, tmp_path):
    run = tmp_path / "run"
    for where, step, left in (("before", 4, None), ("during", 8, 4), ("after", 12, 8)):
        killed = run_cli(run, "--resume", prelude=KILL_AT, hook_args=(where, str(step)))
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        ckpts = Checkpoints(run, 2)
        assert ckpts.latest_step() == left, where  # the cut save of `step` does not count
        ckpts.close()
        if where == "during":
            assert list((run / "checkpoints").glob(f"{step}.orbax-checkpoint-tmp*")), "no temporary directory left"
        if where == "after":
            assert (run / "checkpoints" / "12").is_dir() and not (run / "checkpoints" / "12" / MANIFEST).exists()
    # The resume, in-process (a fresh process adds nothing here that the killed ones did not): from step 8, saving
    # step 12 again over the leftover.
    train(smoke(), run, resume=True)
    assert_same_run(reference, run)
    assert (run / "checkpoints" / "12" / MANIFEST).is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tb_steps = [e.step for e in events.Scalars("train/loss")]
    assert tb_steps == [r["step"] for r in records(run) if "train/loss" in r] == list(range(2, 17, 2))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_checkpoint_is_detected_and_an_older_one_used_only_when_asked(reference, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    step_dir = run / "checkpoints" / "16"
    victim = max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST), key=lambda p: p.stat().st_size)
    name = str(victim.relative_to(step_dir))
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-10])
    else:
        victim.unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint step 16 .* failed verification:\n  {name}: ") as error:
        train(smoke(), run, resume=True)
    assert "--resume-step 12" in str(error.value)
    if damage == "flip":  # the older checkpoint, on request: the run completes exactly as the reference
        train(smoke(), run, resume=True, resume_step=12)
        assert_same_run(reference, run)


def test_a_checkpoint_from_before_params_were_their_own_item_resumes_exactly_and_is_refused_for_eval(
        reference, tmp_path):
    # The reference's step-12 checkpoint rewritten in the layout of earlier versions: one `state` item.
    import orbax.checkpoint as ocp

    from research.experiment import build_model
    from research.run import read_run_config, restore_params

    run = tmp_path / "legacy"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "16")
    manager = ocp.CheckpointManager((run / "checkpoints").absolute())
    old = manager.restore(12, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                      train=ocp.args.StandardRestore(),
                                                      meta=ocp.args.JsonRestore()))
    shutil.rmtree(run / "checkpoints" / "12")
    manager.reload()
    manager.save(12, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": old.params, **old.train}),
                                             meta=ocp.args.JsonSave(old.meta)), force=True)
    manager.close()
    write_manifest(run / "checkpoints" / "12")
    assert {p.name for p in (run / "checkpoints" / "12").iterdir()} >= {MANIFEST, "meta", "state"}
    assert not (run / "checkpoints" / "12" / "params").exists()
    cfg = read_run_config(run)
    with pytest.raises(CheckpointError, match="written before the parameters were stored apart .* Resume the run"):
        restore_params(run, cfg, build_model(cfg, cfg.data.labels), "latest")
    train(smoke(), run, resume=True)  # reads the old layout, writes the new one: the same run as the reference
    assert_same_run(reference, run)
    assert (run / "checkpoints" / "16" / "params").is_dir()


def test_restoring_into_another_shape_lists_every_mismatch(reference):
    from research.experiment import build_model
    from research.run import read_run_config, restore_params

    cfg = read_run_config(reference)
    wider = apply_overrides(cfg, ['model.overrides={"hidden_size": 48, "num_hidden_layers": 1, '
                                  '"num_attention_heads": 2, "intermediate_size": 64}'])
    with pytest.raises(CheckpointError, match=r"does not fit the state it is restored into \((\d+) mismatched\)") as e:
        restore_params(reference, wider, build_model(wider, cfg.data.labels), "latest")
    message = str(e.value)
    assert "params/bert/embeddings/word_embeddings/embedding: checkpoint (30522, 32) float32, expected (30522, 48)" \
        in message
    assert int(message.split("(")[2].split(" ")[0]) > 20  # every layer's tensors, not the first one found


# A child whose file-size limit drops to 1 MiB after its first checkpoint: the next save cannot be written.
DISK_FULL = """
import resource, signal, sys
from research import checkpoint
from research.cli import main

save = checkpoint.Checkpoints.save

def save_then_fill_the_disk(self, step, state, meta):
    save(self, step, state, meta)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

checkpoint.Checkpoints.save = save_then_fill_the_disk
main(sys.argv[1:])
"""


def test_a_full_disk_fails_loudly_and_the_last_checkpoint_survives(reference, tmp_path):
    run = tmp_path / "run"
    failed = run_cli(run, "--set", "checkpoint.keep=1", prelude=DISK_FULL)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "saving checkpoint step 8" in failed.stderr and "the previous checkpoint (step 4) is intact" in failed.stderr
    ckpts = Checkpoints(run, 1)
    assert ckpts.latest_step() == 4  # keep=1, yet step 4 was not deleted for a step 8 that never completed
    ckpts.close()
    train(smoke("checkpoint.keep=1"), run, resume=True)  # in-process, as the other resumes here
    assert deterministic(records(run)) == deterministic(records(reference))


def test_a_second_run_in_the_same_directory_is_refused(tmp_path, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    with (run / ".lock").open("a+") as held:  # as a live run holds it
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirBusyError, match=r"is in use by another run \(process 4242 holds"):
            train(smoke("train.max_steps=1"), run)
    train(smoke("train.max_steps=1"), run)  # released: the directory is usable again
