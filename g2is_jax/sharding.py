"""Device meshes, shardings and multi-process start-up: the small data of scaling out.

Design
------
One mesh with two named axes, ``data`` and ``fsdp`` (``--mesh data=4,fsdp=2``; by default every
device on ``data``). Every program that scales is one jitted function whose inputs carry
`NamedSharding`s; XLA's partitioner (GSPMD) splits it, so there is no per-device Python:

* rows (a batch of examples, the pool's feature matrix T) are split over *all* mesh axes
  (`row_sharding`): with FSDP each device still holds its own examples, as in ZeRO-3, and the
  weights are gathered layer by layer where they are used;
* base weights are sharded over ``fsdp`` on their largest divisible matrix axis
  (`fsdp_shardings`); the leading layer axis of the decoder's stacked weights (everything under
  ``layers``) is never split, so the layer `lax.scan` slices one layer locally; everything else
  is replicated;
* row counts are padded to a multiple of the device count (`pad_rows`) so every device runs the
  same static shape (a TPU compiles one program per length bucket, not per batch).

Several processes (TPU pod hosts, GPU nodes) start with `initialize_distributed`, a checked
wrapper of `jax.distributed.initialize`; after it, `jax.devices()` lists every process's devices
and the same mesh spans them. Host data enters with `jax.make_array_from_callback`, so each
process copies only the rows its own devices hold (`place_rows`), and results leave through
`addressable_rows`: the rows this process's devices computed. On CPU, cross-process collectives
use gloo (JAX's default CPU implementation), which the tests run on loopback.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from g2is_jax.errors import G2ISError
from g2is_jax.models.llama import LAYERS

log = logging.getLogger(__name__)

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
# Environment fallbacks for the CLI's --num-processes / --process-id (jax.distributed itself reads
# JAX_COORDINATOR_ADDRESS, and detects TPU pods, SLURM and Open MPI on its own).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


# ----------------------------------------------------------------------------- mesh specs


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Axis sizes of the mesh; -1 means "every device left over" (at most one axis)."""

    data: int = -1
    fsdp: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp)
        if any(isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1)
               for s in sizes):
            raise G2ISError(f"mesh axis sizes must be positive integers (or -1 for 'the rest'), "
                            f"got data={self.data}, fsdp={self.fsdp}")
        if sizes.count(-1) > 1:
            raise G2ISError("at most one mesh axis may be -1 (the devices left over)")

    def resolve(self, n_devices: int) -> tuple[int, int]:
        """(data, fsdp) sizes for `n_devices` devices; G2ISError when they do not multiply."""
        data, fsdp = self.data, self.fsdp
        fixed = math.prod(s for s in (data, fsdp) if s != -1)
        if -1 in (data, fsdp):
            if n_devices % fixed:
                raise G2ISError(f"mesh {self}: {n_devices} devices are not divisible by {fixed}; "
                                "choose axis sizes that divide the device count")
            data, fsdp = (n_devices // fixed, fsdp) if data == -1 else (data, n_devices // fixed)
        if data * fsdp != n_devices:
            raise G2ISError(f"mesh {self} has {data * fsdp} devices but {n_devices} are present; "
                            f"the axis sizes must multiply to {n_devices} (e.g. "
                            f"--mesh data={n_devices})")
        return data, fsdp

    def __str__(self) -> str:
        return f"data={self.data},fsdp={self.fsdp}"


def parse_mesh(text: str | None) -> MeshSpec:
    """``"data=4,fsdp=2"`` → `MeshSpec`. Missing axes: data = the rest, fsdp = 1."""
    if text is None or not text.strip():
        return MeshSpec()
    sizes: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*([a-z_]+)\s*=\s*(-?\d+)\s*", part)
        if m is None:
            raise G2ISError(f"cannot read mesh {text!r}: write axis=size pairs separated by "
                            "commas, e.g. data=4,fsdp=2")
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise G2ISError(f"unknown mesh axis {name!r} in {text!r}; the axes are "
                            f"{', '.join(AXES)}")
        if name in sizes:
            raise G2ISError(f"mesh axis {name!r} is given twice in {text!r}")
        sizes[name] = size
    return MeshSpec(**sizes)


def make_mesh(spec: MeshSpec | str | None = None, devices: Any = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over `devices` (default: every device of every process).

    Without explicit devices `jax.make_mesh` orders them for the physical topology (TPU rings).
    Axes are `AxisType.Auto`: the partitioner decides the shardings of intermediates.
    """
    if not isinstance(spec, MeshSpec):
        spec = parse_mesh(spec)
    explicit = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise G2ISError("no devices to build a mesh from")
    shape = spec.resolve(len(devices))
    types = (AxisType.Auto, AxisType.Auto)
    if explicit:
        return Mesh(np.array(devices).reshape(shape), AXES, axis_types=types)
    return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)


def mesh_description(mesh: Mesh) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.shape.items())


# ----------------------------------------------------------------------------- shardings


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over every mesh axis (a batch of examples, or T's rows)."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_axis(shape: tuple[int, ...], fsdp: int, *, leading: int = 0) -> int | None:
    """The axis of a weight to split over ``fsdp`` devices, or None to replicate it.

    The first `leading` axes (a stacked weight's layer axis) are never split, so the layer
    `lax.scan` slices one layer locally. Of the rest, only the two trailing (matrix) axes are
    candidates; of those, the largest divisible one (the later on a tie). Vectors (norm
    scales, biases; stacked or not) are replicated: they are small.
    """
    if fsdp <= 1 or len(shape) - leading < 2:
        return None
    candidates = [a for a in (len(shape) - 2, len(shape) - 1) if shape[a] % fsdp == 0]
    if not candidates:
        return None
    return max(candidates, key=lambda a: (shape[a], a))


def _stacked(path: tuple) -> bool:
    """Whether the leaf at `path` carries the model's leading layer axis (it lies under the
    decoder's ``layers`` node, see `g2is_jax.models.llama.LAYERS`)."""
    return any(getattr(k, "key", getattr(k, "name", None)) == LAYERS for k in path)


def fsdp_shardings(tree: Any, mesh: Mesh) -> Any:
    """A pytree of `NamedSharding`s for `tree`'s leaves (see `fsdp_axis`): a model state (or its
    base or LoRA part), whose leaves under ``layers`` keep their leading layer axis whole."""
    fsdp = mesh.shape[FSDP]

    def one(path, leaf):
        axis = fsdp_axis(tuple(np.shape(leaf)), fsdp, leading=int(_stacked(path)))
        if axis is None:
            return replicated(mesh)
        spec = [None] * np.ndim(leaf)
        spec[axis] = FSDP
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(one, tree)


def pad_rows(n: int, mesh_or_multiple: Mesh | int) -> int:
    """`n` rounded up to a multiple of the device count (or of an int), at least one multiple."""
    multiple = mesh_or_multiple if isinstance(mesh_or_multiple, int) else mesh_or_multiple.size
    if multiple < 1:
        raise G2ISError(f"pad multiple must be positive, got {multiple}")
    return max(1, -(-int(n) // multiple)) * multiple


# ----------------------------------------------------------------------------- placing data


def _from_host(host: Any, shape: tuple[int, ...], sharding: NamedSharding) -> jax.Array:
    """A global array from a host array (or a function of an index tuple) every process holds."""
    fetch: Callable[[Any], Any] = host if callable(host) else (lambda idx: np.asarray(host[idx]))
    return jax.make_array_from_callback(shape, sharding, fetch)


def place(tree: Any, shardings: Any) -> Any:
    """Put a pytree of host or single-device arrays onto `shardings` (a matching pytree, or one
    sharding for all leaves). Works across processes when every process holds the same values.
    A leaf already placed so is returned as it is (never copied through the host)."""
    if isinstance(shardings, NamedSharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

    def one(x, s):
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(s, x.ndim):
                return x  # already there (a model loaded onto the mesh): no host round trip
            if x.is_fully_addressable and s.is_fully_addressable:
                return jax.device_put(x, s)
        host = np.asarray(x)
        return _from_host(host, host.shape, s)

    return jax.tree_util.tree_map(one, tree, shardings)


def place_rows(x: Any, mesh: Mesh, n_padded: int) -> jax.Array:
    """Rows of `x` (N, ...) as a row-sharded global array of `n_padded` rows, zero rows after N.

    Each process reads only the rows its devices hold, so `x` may be a memory map of a file far
    larger than one host's share.
    """
    n = x.shape[0]
    if n_padded < n:
        raise ValueError(f"n_padded = {n_padded} < {n} rows")
    shape = (n_padded, *x.shape[1:])

    def fetch(idx):
        rows = idx[0]
        start, stop = rows.start or 0, n_padded if rows.stop is None else rows.stop
        out = np.zeros((stop - start, *x.shape[1:]), np.asarray(x[:0]).dtype)
        real = max(0, min(stop, n) - start)
        if real:
            out[:real] = np.asarray(x[start : start + real])
        return out[(slice(None), *idx[1:])]

    return _from_host(fetch, shape, row_sharding(mesh))


def addressable_rows(x: jax.Array) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of each block of a row-sharded array that this process holds, once per
    block (replicas skipped), in row order."""
    blocks = sorted(((s.index[0].start or 0), s) for s in x.addressable_shards if s.replica_id == 0)
    for start, shard in blocks:
        yield start, np.asarray(shard.data)


def local_row_positions(mesh: Mesh, n_rows: int) -> np.ndarray:
    """Sorted positions of a row-sharded array of `n_rows` rows that this process's devices hold."""
    index_map = row_sharding(mesh).addressable_devices_indices_map((n_rows,))
    pos = set()
    for idx in index_map.values():
        rows = idx[0]
        pos.update(range(rows.start or 0, n_rows if rows.stop is None else rows.stop))
    return np.array(sorted(pos), dtype=np.int64)


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated (or single-process) array as NumPy, in every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if not x.is_fully_replicated:
        raise ValueError("to_host needs a replicated array across processes")
    return np.asarray(x.addressable_data(0))


# ----------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """Where this process sits in a multi-process run (``coordinator`` "auto": detect)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        n, i, c = self.num_processes, self.process_id, self.coordinator
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise G2ISError(f"--num-processes must be a positive integer, got {n!r}")
        if i is not None and (isinstance(i, bool) or not isinstance(i, int) or i < 0):
            raise G2ISError(f"--process-id must be a non-negative integer, got {i!r}")
        if n is not None and i is not None and i >= n:
            raise G2ISError(f"--process-id {i} is out of range for --num-processes {n}: "
                            f"process ids run from 0 to {n - 1}")
        if c is not None and c != "auto":
            m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\s]+):(\d+)", c)
            if m is None or not 0 < int(m.group(2)) < 65536:
                raise G2ISError(f"--coordinator must be HOST:PORT (port 1-65535) or 'auto', "
                                f"got {c!r}")
            if n is None or i is None:
                raise G2ISError("--coordinator needs --num-processes and --process-id (or the "
                                f"environment variables {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})")
        elif c is None and (n or 1) > 1:
            raise G2ISError(f"--num-processes {n} needs --coordinator HOST:PORT (process 0's "
                            "address, the same for every process) or --coordinator auto")

    @property
    def multi(self) -> bool:
        return self.coordinator == "auto" or (self.num_processes or 1) > 1


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise G2ISError(f"environment variable {name} must be an integer, got {text!r}") from None


def process_spec(coordinator: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> ProcessSpec:
    """A `ProcessSpec` from explicit values, falling back to the environment variables."""
    return ProcessSpec(
        coordinator if coordinator is not None else os.environ.get(ENV_COORDINATOR),
        num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES),
        process_id if process_id is not None else _env_int(ENV_PROCESS_ID),
    )


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Join a multi-process run through `jax.distributed.initialize`; False for one process.

    Must run before any JAX computation in the process. ``coordinator="auto"`` lets JAX detect a
    TPU pod, SLURM or Open MPI job. Values not given come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    """
    spec = process_spec(coordinator, num_processes, process_id)
    if not spec.multi:
        return False
    if jax.distributed.is_initialized():  # a second command in this process (grads, then select)
        joined = (jax.process_count(), jax.process_index())
        wanted = (spec.num_processes, spec.process_id)
        if any(w is not None and w != j for w, j in zip(wanted, joined)):
            raise G2ISError(f"this process already joined a run as process {joined[1]} of "
                            f"{joined[0]}; it cannot join {spec}")
        return True
    kwargs = {} if spec.coordinator == "auto" else {
        "coordinator_address": spec.coordinator, "num_processes": spec.num_processes,
        "process_id": spec.process_id}
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise G2ISError(f"cannot join the multi-process run ({spec}): {e}. Start every "
                        "process with the same --coordinator and --num-processes, each with its "
                        "own --process-id, before any other JAX work") from e
    log.info("process %d of %d, %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """True in process 0, the one that logs results and writes shared files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_processes(flags: np.ndarray) -> np.ndarray:
    """Elementwise AND of a bool vector over processes (the vector itself for one process)."""
    flags = np.asarray(flags, dtype=bool)
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(flags.astype(np.int32))
    return np.asarray(gathered).reshape(jax.process_count(), -1).min(axis=0).astype(bool)


def gather_processes(values: Any) -> np.ndarray:
    """Stack a same-shaped array from every process: (process_count, *shape), in every process.
    Values travel bit for bit; int64 and float64 need `jax_enable_x64` (send bytes instead)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def raise_if_any_failed(error: BaseException | None, what: str, hint: str = "") -> None:
    """Collective: every process says whether it failed at `what` (its `error`, or None), and if
    any did, every process raises, so none is left waiting in a later collective. The failing
    process raises its own error (a G2ISError as it is); the others name the failing processes.
    """
    ok = gather_processes(np.int32(error is None))
    if error is not None:
        if isinstance(error, G2ISError):
            raise error
        raise G2ISError(f"{what} failed in process {jax.process_index()}: {error}"
                        f"{'; ' + hint if hint else ''}") from error
    failed = np.flatnonzero(ok == 0).tolist()
    if failed:
        raise G2ISError(f"{what} failed in process(es) {', '.join(map(str, failed))}: see their "
                        f"messages{'; ' + hint if hint else ''}")


# Bytes of one gather step, all processes together: each process sends at most this divided
# by the process count. 64 MiB: 1,023 rows of d = 8192 float32 per process per step with two
# processes. Measured (scripts/bench_gather.py, 2 processes on loopback, CPU): process 0's peak
# memory grows by 4-7x the bound (the block, its device copies, the gathered rows, their
# float copy; on CPU device buffers are host memory), the same for 156 MB and 1.25 GB gathered.
GATHER_CHUNK_BYTES = 64 << 20
_NO_ROW = np.frombuffer(np.int64(-1).astype("<i8").tobytes(), np.uint8)


def gather_rows_to_primary(indices: np.ndarray, read: Callable[[int, int], np.ndarray],
                           sink: Callable[[np.ndarray, np.ndarray], None] | None, *, dim: int,
                           dtype: Any = np.float32, chunk_bytes: int | None = None) -> int:
    """Send every process's rows to process 0 over the distributed runtime, in bounded steps.

    Every process calls it with its own rows: `indices` (k,) are their row numbers in the whole
    and ``read(start, stop)`` returns rows ``start:stop`` of them, (stop - start, dim) of `dtype`.
    In process 0, ``sink(row_numbers, rows)`` then receives every process's rows (its own
    included), once per step. No shared file system is needed.

    A step is one `process_allgather` of a fixed-size byte block from each process: per row its
    row number (int64) then its bytes, so values arrive bit for bit (no float arithmetic; -0.0
    and NaN payloads kept). Rows per process per step = ``chunk_bytes // (process_count ×
    (8 + dim × itemsize))`` (at least 1), so a step moves at most `chunk_bytes` (default
    `GATHER_CHUNK_BYTES`) into each process and onto each of its devices, however large N is
    (peak memory: a few times that, see `GATHER_CHUNK_BYTES`); the number of steps is set by
    the process with the most rows. A `read` or `sink` error does
    not strand the others: that process sends empty blocks from then on, and after the last step
    every process raises (`raise_if_any_failed`). Returns the number of steps.
    """
    indices = np.asarray(indices, dtype=np.int64)
    dtype = np.dtype(dtype).newbyteorder("<")
    width = 8 + dim * dtype.itemsize
    budget = GATHER_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise G2ISError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    per_step = max(1, budget // (jax.process_count() * width))
    steps = -(-int(gather_processes(np.int32(indices.size)).max()) // per_step)
    error: BaseException | None = None
    for step in range(steps):
        block = np.zeros((per_step, width), np.uint8)
        block[:, :8] = _NO_ROW
        lo, hi = step * per_step, min((step + 1) * per_step, indices.size)
        if error is None and lo < hi:
            try:
                rows = np.ascontiguousarray(read(lo, hi), dtype=dtype)
                if rows.shape != (hi - lo, dim):
                    raise ValueError(f"read({lo}, {hi}) gave shape {rows.shape}, "
                                     f"not {(hi - lo, dim)}")
                block[: hi - lo, :8] = indices[lo:hi].astype("<i8")[:, None].view(np.uint8)
                block[: hi - lo, 8:] = rows.view(np.uint8).reshape(hi - lo, -1)
            except Exception as e:  # noqa: BLE001 - reported to every process below
                error = e
                block[:, :8] = _NO_ROW
        gathered = gather_processes(block).reshape(-1, width)
        if sink is None or error is not None or not is_primary():
            continue
        row_numbers = gathered[:, :8].copy().view("<i8")[:, 0]
        keep = row_numbers >= 0
        try:
            if keep.any():
                sink(row_numbers[keep], gathered[keep, 8:].view(dtype))  # one copy
        except Exception as e:  # noqa: BLE001 - reported to every process below
            error = e
    raise_if_any_failed(error, "gathering rows to process 0")
    return steps


__all__ = [
    "AXES",
    "DATA",
    "FSDP",
    "MeshSpec",
    "ProcessSpec",
    "addressable_rows",
    "all_processes",
    "barrier",
    "fsdp_axis",
    "fsdp_shardings",
    "gather_processes",
    "gather_rows_to_primary",
    "initialize_distributed",
    "is_primary",
    "local_row_positions",
    "make_mesh",
    "mesh_description",
    "pad_rows",
    "parse_mesh",
    "place",
    "place_rows",
    "process_spec",
    "raise_if_any_failed",
    "replicated",
    "row_sharding",
    "to_host",
]
