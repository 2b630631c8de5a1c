"""Data parallelism over every device of every host: a 1-D "data" mesh, replicated params, sharded batches.

One jit-compiled program runs on 1 or N devices alike (XLA SPMD partitions the batch axis). With several
processes (`jax.distributed`), every process holds the devices of its slice of the mesh and supplies only its
own rows of each global batch; the result comes back per process. Randomness never depends on the split:
image i of a request always uses `fold_in(key(seed), i)`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.errors import UserError

DATA_AXIS = "data"


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, log=None) -> bool:
    """Join a multi-host run when asked to (arguments, or LDM_JAX_COORDINATOR / LDM_JAX_NUM_PROCESSES /
    LDM_JAX_PROCESS_ID, or a cluster JAX auto-detects). Returns True when running multi-process."""
    coordinator = coordinator or os.environ.get("LDM_JAX_COORDINATOR")
    if num_processes is None:
        num_processes = _env_int("LDM_JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("LDM_JAX_PROCESS_ID")
    if coordinator or num_processes is not None or process_id is not None:
        if num_processes is not None and num_processes < 1:
            raise UserError(f"the number of processes must be >= 1, got {num_processes}")
        if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
            raise UserError(f"the process id must be in [0, {num_processes}), got {process_id}")
        if coordinator is not None:
            _check_address(coordinator)
        if log is not None and coordinator and num_processes:
            who = "" if process_id is None else f" as process {process_id}"
            log(f"joining a {num_processes}-process run at {coordinator}{who}; waiting for the others (up to 5 "
                "minutes) ...")
        # CPU runs have cross-process collectives (gradient all-reduce, orbax's multi-host barriers) only with
        # gloo; it must be set before the backend starts and has no effect on GPU/TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:  # what a cluster does not supply (SLURM, TPU pods fill in the rest) is an error naming the flag
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                       process_id=process_id)
        except (ValueError, RuntimeError) as e:
            raise UserError("cannot join the multi-host run (--coordinator HOST:PORT, --num-processes N and "
                            f"--process-id I, or their LDM_JAX_* variables): {str(e).splitlines()[0]}") from e
    return jax.process_count() > 1


_keys = itertools.count()  # every process makes the same calls in the same order, so keys match across processes


def _client():
    from jax._src import distributed  # the coordination service's client (JAX's compiler and orbax use it too)

    return distributed.global_state.client


def wait_for_all_processes(name: str, timeout_s: int = 900) -> None:
    """Block until every process of a multi-host run gets here (nothing with one process). A barrier of the
    coordination service, not a device collective: CPU runs set up gloo at their first collective and give up
    after 30 s, so a host still compiling a program another host has finished would fail the run."""
    if jax.process_count() > 1:
        try:
            _client().wait_at_barrier(f"ldm-jax/{name}/{next(_keys)}", timeout_s * 1000)
        except Exception as e:  # noqa: BLE001 - jaxlib raises its runtime error for a timeout
            raise UserError(f"not every process got to '{name}' within {timeout_s} s (one stopped, or is much "
                            f"slower): {str(e).splitlines()[0][:200]}") from None


def share(name: str, value: str, timeout_s: int = 900) -> list[str]:
    """Every process's `value`, in process order ([value] with one process), through the coordination service's
    key-value store: no device collective, so a process that arrives late only makes the others wait."""
    if jax.process_count() == 1:
        return [value]
    client, key = _client(), f"ldm-jax/{name}/{next(_keys)}"
    client.key_value_set(f"{key}/{jax.process_index()}", value)
    values = [_get(client, f"{key}/{p}", p, name, timeout_s) for p in range(jax.process_count())]
    # no process leaves before all have read every value: a check that fails on every process alike ends the CLI
    # with os._exit, and process 0's exit takes the coordination service down under a slower reader
    try:
        wait_for_all_processes(f"{name} read", timeout_s=60)  # all values are set: everyone is a moment away
    except UserError:
        pass  # one is gone since it set its value: what it shared is still the answer
    return values


def check_same_everywhere(settings: dict, hint: str) -> None:
    """Multi-host: refuse, on every process alike, a run whose processes were given different `settings`
    (JSON-able values; compared by digest)."""
    if jax.process_count() == 1:
        return
    mine = json.dumps(settings, sort_keys=True, default=repr)
    digests = share("settings", hashlib.sha256(mine.encode()).hexdigest(), timeout_s=600)
    differ = [str(i) for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise UserError(f"process(es) {', '.join(differ)} were started with other settings than process 0 ({hint})")


def from_process_0(name: str, make_value, timeout_s: int = 3600) -> str:
    """Process 0's `make_value()` (a str) on every process: process 0 computes and publishes it without waiting
    for anyone; the others wait for it."""
    if jax.process_count() == 1:
        return make_value()
    client, key = _client(), f"ldm-jax/{name}/{next(_keys)}"
    if jax.process_index() == 0:
        value = make_value()
        client.key_value_set(key, value)
        return value
    return _get(client, key, 0, name, timeout_s)


def leave_in_order(timeout_s: float = 10.0) -> None:
    """Before an error exit (os._exit) of a multi-host run: processes other than 0 say they are leaving, and process
    0, which hosts the coordination service, waits for them (at most `timeout_s`: one may never get here) and a moment
    more, so that its exit does not take the service away under a slower peer; JAX aborts a process whose
    coordination service vanishes (SIGABRT instead of that process's own one-line error and exit status 2)."""
    try:
        client = _client()
        if jax.process_index() != 0:
            client.key_value_set(f"ldm-jax/leaving/{jax.process_index()}", "1")
            return
        deadline = time.monotonic() + timeout_s
        for p in range(1, jax.process_count()):
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            client.blocking_key_value_get(f"ldm-jax/leaving/{p}", max(left_ms, 1))
        time.sleep(0.2)  # each leaves right after saying so
    except Exception:  # noqa: BLE001 - a peer gone or the wait timed out: leave anyway
        pass


def _get(client, key: str, process: int, name: str, timeout_s: int) -> str:
    try:
        return client.blocking_key_value_get(key, timeout_s * 1000)
    except Exception:  # noqa: BLE001 - jaxlib raises its runtime error for a timeout
        raise UserError(f"process {process} did not get to '{name}' within {timeout_s} s (it stopped, or is much "
                        "slower than this one)") from None


def _check_address(address: str) -> None:
    """HOST:PORT (an IPv6 host in brackets), PORT in 1..65535: jax.distributed crashes on anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"the coordinator address must be HOST:PORT with PORT in 1..65535, got {address!r}")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


@lru_cache(maxsize=None)
def data_mesh() -> Mesh:
    """All devices of all processes on one "data" axis, process-major (each process's devices contiguous)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh | None = None) -> NamedSharding:
    return NamedSharding(mesh or data_mesh(), P(DATA_AXIS))


def replicated(mesh: Mesh | None = None) -> NamedSharding:
    return NamedSharding(mesh or data_mesh(), P())


def abstract_like(tree, sharding):
    """ShapeDtypeStruct leaves (shape and dtype of `tree`'s leaves) placed by `sharding`: what `jit(...).lower`
    and orbax's restore take to compile or load without allocating anything."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


@dataclass(frozen=True)
class BatchPlan:
    """How a request for n images is split: padded to a multiple of the device count; rows [start, stop) of
    the padded global batch belong to this process; rows >= n are padding, dropped from the output."""

    n: int
    padded: int
    start: int
    stop: int

    @property
    def local_indices(self) -> np.ndarray:
        return np.arange(self.start, self.stop)

    @property
    def local_valid(self) -> np.ndarray:
        """Mask over this process's rows: True for real images, False for padding."""
        return self.local_indices < self.n


def plan_batch(n: int, mesh: Mesh | None = None) -> BatchPlan:
    mesh = mesh or data_mesh()
    n_dev = mesh.devices.size
    padded = math.ceil(n / n_dev) * n_dev
    per_process = padded // jax.process_count()
    start = jax.process_index() * per_process
    return BatchPlan(n, padded, start, start + per_process)


def shard_rows(local: np.ndarray, mesh: Mesh | None = None) -> jax.Array:
    """This process's rows -> one global array sharded over the data axis."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array that live on this process's devices, in order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for s in shards:  # replicas of the same rows (if any) appear once
        start = s.index[0].start or 0
        if start not in seen:
            seen.add(start)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows)


def replicate(tree, mesh: Mesh | None = None):
    """Put a tree (params, scalars) on every device of the mesh. With several processes each one places its
    own copy on its own devices: `device_put` would first check across hosts that the copies are equal,
    a collective that CPU runs lack (and that costs a transfer of every parameter on GPU/TPU)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        shards = [jax.device_put(x, d) for d in sorted(sharding.addressable_devices, key=lambda d: d.id)]
        return jax.make_array_from_single_device_arrays(np.shape(x), sharding, shards)

    return jax.tree_util.tree_map(one, tree)


def device_zeros(abstract, sharding):
    """Zeros with the tree, shapes and dtypes of `abstract` (ShapeDtypeStruct leaves), made on the devices of
    `sharding` by one small program (nothing crosses from the host). Leaves of equal shape and dtype share one
    buffer (SD 1.x: 79 distinct of 1130 leaves, 0.8 of 4.3 GB), so use them as read-only inputs only."""
    leaves, tree = jax.tree_util.tree_flatten(abstract)
    kinds = sorted({(tuple(x.shape), np.dtype(x.dtype).str) for x in leaves})
    make = jax.jit(lambda: [jnp.zeros(shape, dtype) for shape, dtype in kinds],
                   out_shardings=[sharding] * len(kinds))
    buffers = dict(zip(kinds, make()))
    return tree.unflatten([buffers[(tuple(x.shape), np.dtype(x.dtype).str)] for x in leaves])
