"""Devices: one `Mesh` with a single data axis, batches split along that axis, parameters replicated or,
with `train.fsdp`, sharded along it too.

Works unchanged from 1 device to N, and across hosts: `init_distributed` joins a multi-host job, after which
`jax.devices()` lists every host's devices and each host feeds only the rows of the batch its devices hold.

FSDP (ZeRO-3 style): every parameter large enough, and the optimizer state that mirrors it, is split over
the data axis along its largest dimension that the device count divides, so each device holds about 1/N of
them. The train step is the same jitted function; XLA's SPMD partitioner gathers a weight where a layer
needs it whole and reduce-scatters its gradient, which is the FSDP schedule. Same math as replicated (only
the order of float sums changes; tests/test_train.py checks it on 8 devices).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from research.batch import Batch

DATA_AXIS = "data"


def init_distributed() -> None:
    """Join a multi-host job when one is configured; a no-op for a single process.

    `jax.distributed.initialize()` finds the coordinator itself on SLURM, Open MPI, Cloud TPU and GKE; on
    other clusters set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def make_mesh(devices: list | None = None) -> Mesh:
    return Mesh(np.array(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


FSDP_MIN_SIZE = 1 << 14  # elements: smaller arrays (biases, LayerNorm) stay replicated, splitting them costs more


def state_shardings(state, mesh: Mesh, fsdp: bool):
    """Shardings for a pytree of arrays: all replicated, or with `fsdp` split over the data axis along the
    largest dimension divisible by the device count (module docstring). The choice depends on the shape
    alone, so Adam's moments land where their parameters do."""
    n = mesh.devices.size

    def choose(x):
        dims = [d for d in range(x.ndim) if x.shape[d] % n == 0]
        if not fsdp or n == 1 or not dims or x.size < FSDP_MIN_SIZE:
            return replicated(mesh)
        axis = max(dims, key=lambda d: x.shape[d])
        return NamedSharding(mesh, P(*[DATA_AXIS if d == axis else None for d in range(x.ndim)]))

    return jax.tree.map(choose, state)


def place_rest(rest, mesh: Mesh):
    """A model's non-parameter state (dropout streams; under PEFT the frozen weights) replicated over the mesh
    once, rather than copied to every device at every step. With several processes jit places it as before:
    `device_put` cannot reach other hosts' devices from a process-local array."""
    return jax.device_put(rest, replicated(mesh)) if jax.process_count() == 1 else rest


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are laid out (micro-batches, rows, ...): the rows axis is split over the data axis, so every
    micro-batch of gradient accumulation is spread over all devices."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def check_divisible(batch_size: int, grad_accum: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    n = mesh.devices.size
    if batch_size % (grad_accum * n):
        raise ValueError(f"{what}={batch_size} must be divisible by grad_accum ({grad_accum}) x devices ({n}) "
                         f"= {grad_accum * n}")


def put_batch(batch: Batch, mesh: Mesh, grad_accum: int = 1) -> Batch:
    """A host batch (B, ...) as global arrays (grad_accum, B / grad_accum, ...) split over the mesh.

    Every host builds the same global batch (cheap, and it fixes the bucket length globally); each then
    hands over only the rows its own devices hold."""
    sharding = batch_sharding(mesh)

    def put(x: np.ndarray) -> jax.Array:
        x = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])  # (B, ...) -> (A, B/A, ...)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        rows = x.shape[1] // jax.process_count()
        local = x[:, jax.process_index() * rows : (jax.process_index() + 1) * rows]
        return jax.make_array_from_process_local_data(sharding, local, x.shape)

    return jax.tree.map(put, batch)
