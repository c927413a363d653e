"""Records → gradient features on disk: the driver behind `g2is grads`.

The plan is fixed by the input alone: records are encoded, grouped into static-shape batches by
length bucket (`make_batches(order="bucketed")`, no shuffling), and every batch runs through one
jitted program per bucket (per-example grads → feature transform → projection, see
`g2is_jax.gradients.feature_fn`). Each finished batch is committed to the resumable feature store;
on a restart the batches already committed are skipped, so a killed run finishes with the same
bytes as an uninterrupted one. Everything that decides the bytes (model, adapter or checkpoint,
data hash, gradient type, projection, batch size, max length, dtype) goes into meta.json, and the
store refuses to resume under a different one.

Scaling out (`g2is_jax.sharding`): every batch is padded with empty rows to a multiple of the
mesh's device count and split over all devices, the base weights over the ``fsdp`` axis, and the
same jitted program runs over the mesh. The batch plan does not depend on the mesh, nor does the
projection (a pure function of seed, P and d), so a row's features agree across device counts
to float rounding (~5e-10 seen in the tests: XLA sums a smaller per-device batch in
another order). With several processes every process builds the
same plan, feeds its devices only their rows, and commits the rows its devices computed to its
own resumable shard store ``OUT/shards/process-<i>-of-<n>``; a batch is skipped on resume only
when every process has it. After a barrier the shards become ``OUT`` on process 0, the same
features.npy and meta.json, byte for byte, as one process, in one of two ways (`gather`):

* ``"shared-fs"`` (default): ``OUT`` is one folder every process writes to; process 0 reads the
  shard folders and merges them (`store.merge_shards`);
* ``"network"``: no shared folder; each process keeps its shard on its own disk and sends its
  rows to process 0 over the JAX distributed runtime in steps of at most `gather_chunk_bytes`
  (`sharding.gather_rows_to_primary`), and process 0 writes them into ``OUT``.

NaN and Inf are checked where rows are computed: each process over its own rows (the store
refuses them on commit); process 0 does not scan the rows it merges or receives again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from g2is_jax import __version__, sharding
from g2is_jax.data import Batch, Record, encode_records, length_buckets, make_batches
from g2is_jax.errors import G2ISError
from g2is_jax.fingerprint import tokenizer_fingerprint, tree_fingerprint
from g2is_jax.gradients import AdamMoments, feature_fn
from g2is_jax.models.llama import Llama
from g2is_jax.models.lora import (
    LORA_FLAT_ORDER,
    completion_loss,
    count_params,
    merge_lora,
    split_lora,
)
from g2is_jax.progress import progress_bar
from g2is_jax.projection import Projector, flatten_per_example
from g2is_jax.store import (
    FEATURES,
    GRADIENTS,
    STORE_DTYPES,
    merge_shards,
    open_store,
    row_dtype,
    save_shard_rows,
)

log = logging.getLogger(__name__)


def representation_fn(graphdef) -> Any:
    """A jitted ``f(lora, base, batch, moments=None) -> (rows [B, H], finite [B])``: the final
    (normed) hidden state at each row's last real token."""

    @jax.jit
    def f(lora, base, batch, moments=None):
        model = merge_lora(graphdef, base, lora)
        hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        last = jnp.maximum(jnp.sum(batch["attention_mask"], axis=1) - 1, 0)
        rows = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        rows = rows.astype(jnp.float32)
        return rows, jnp.all(jnp.isfinite(rows), axis=1)

    return f


def compute_features(model: Llama, tokenizer, records: Sequence[Record], out: str | Path, *,
                     gradient: str, projector: Projector | None = None,
                     moments: AdamMoments | None = None,
                     batch_size: int = 8, max_length: int = 2048,
                     meta: dict[str, Any] | None = None, overwrite: bool = False,
                     progress: bool = True, mesh: Mesh | None = None,
                     gather: str = "shared-fs", gather_chunk_bytes: int | None = None,
                     feature_dtype: str = "float32") -> Path:
    """Write the features of `records` (row i = record i) to the store `out`.

    `gradient` is "sgd", "adam" or "sign" (gradients with respect to the LoRA adapters `model`
    carries, projected by `projector`, required), or "representation": the final hidden state at
    each record's last token, as LESS's RDS baseline uses (unprojected, width = hidden size;
    `projector` must be None or ``Projector(kind="none")``).
    meta.json records content fingerprints of what the rows depend on: the adapters
    (``lora_fingerprint``), the Adam moments (``moments_fingerprint``, adam only) and the
    tokenizer; the base weights' identity is the caller's to give in `meta`
    (``model_fingerprint``, from `g2is_jax.fingerprint.model_fingerprint`), else the ``model``
    text in `meta` is compared. A resume under any other value is refused.
    `mesh` (`g2is_jax.sharding.make_mesh`; default: every device on ``data``) splits each batch
    over its devices and the base weights over its ``fsdp`` axis; with several processes each
    writes its own rows and process 0 merges them: from the shard folders under `out`
    (``gather="shared-fs"``: `out` must be one folder for all processes) or over the network
    (``gather="network"``, at most `gather_chunk_bytes` per step, default
    `sharding.GATHER_CHUNK_BYTES`); see the module docstring.
    `feature_dtype` ("float32" or "bfloat16") is the dtype the rows are stored in: computed in
    float32 whatever the model's dtype, then rounded once on writing.
    Returns the path of the finished `features.npy` (on process 0's file system).
    """
    if not records:
        raise G2ISError("no records to compute features for")
    if gradient not in GRADIENTS:
        raise G2ISError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise G2ISError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    if gradient == "adam" and moments is None:
        raise G2ISError("gradient='adam' needs the checkpoint's Adam moments (moments=...)")
    if gather not in GATHERS:
        raise G2ISError(f"gather must be one of {', '.join(GATHERS)}, got {gather!r}",
                        param="gather")
    if feature_dtype not in STORE_DTYPES:
        raise G2ISError(f"feature_dtype must be one of {', '.join(STORE_DTYPES)}, got "
                        f"{feature_dtype!r}", param="feature_dtype")
    mesh = sharding.make_mesh() if mesh is None else mesh
    graphdef, base, lora = split_lora(model)
    n_params = count_params(lora)
    if gradient == "representation":
        if projector is not None and projector.kind != "none":
            raise G2ISError("representation features are not projected: pass projector=None "
                            f"(got a {projector.kind!r} projector)")
        projector = Projector(kind="none")
        dim = model.config.hidden_size
    else:
        if model.lora_config is None:
            raise G2ISError("the model has no LoRA adapters: pass a warmup --checkpoint or a "
                            "PEFT --adapter")
        if projector is None:
            raise G2ISError(f"{gradient} features need a projector (e.g. "
                            "Projector(kind='rademacher', dim=8192), or kind='none')")
        dim = projector.out_dim(n_params)
        # Flatten, then project once: projecting leaf by leaf (`Projector.apply_tree`) compiles
        # one loop per LoRA leaf (240 for SmolLM2 on q,k,v,o), measured 77 s of XLA compile
        # against 10 s for one loop over the concatenation; the [B, P] rows exist as gradients.
    encoded, report = encode_records(records, tokenizer, max_length=max_length, progress=False)
    if report.n_truncated:
        log.warning("%d of %d records truncated to %d tokens", report.n_truncated, len(records),
                    max_length)
    # Nothing about the mesh or the processes goes into meta.json: they do not change the rows
    # (beyond float rounding across device counts), and the merged store of a multi-process run
    # must equal a single-process one byte for byte.
    full_meta = {
        **(meta or {}),
        "gradient": gradient,
        "projection": projector.describe(),
        "lora_params": n_params,
        "lora_flat_order": LORA_FLAT_ORDER,  # rows of another column order must not mix
        "model_dtype": model.dtype_name,
        "batch_size": batch_size,
        "max_length": max_length,
        "n_truncated": report.n_truncated,
        "record_ids": [r.id for r in records],
        "package_version": __version__,
        "jax_version": jax.__version__,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "lora_fingerprint": tree_fingerprint(lora),
        "moments_fingerprint": tree_fingerprint(moments) if gradient == "adam" else None,
        "dtype": feature_dtype,  # the store's row dtype (open_store reads it from here)
    }
    # Paths are for people; what is compared on resume is the content they held.
    ignore = IGNORED_META + tuple(k for k, fp in _PATH_KEYS.items() if full_meta.get(fp))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    batches = make_batches(encoded, batch_size=batch_size, buckets=length_buckets(max_length),
                           pad_id=pad, order="bucketed")
    plan = _Plan(mesh, sharding.pad_rows(batch_size, mesh))
    if plan.rows != batch_size:
        log.warning("batch size %d padded to %d rows for %d devices (%.0f%% idle); choose a "
                    "multiple of %d", batch_size, plan.rows, mesh.size,
                    100 * (1 - batch_size / plan.rows), mesh.size)
    placed = (sharding.place(lora, sharding.replicated(mesh)),
              sharding.place(base, sharding.fsdp_shardings(base, mesh)),
              sharding.place(moments, sharding.replicated(mesh)))
    # One program per bucket, compiled once per structure (`_feature_step`).
    step = _feature_step(graphdef, gradient, projector, mesh)
    if jax.process_count() == 1:
        with open_store(out, full_meta, len(records), dim, overwrite=overwrite,
                        ignore=ignore) as store:
            _run_batches(store, batches, plan, step, placed, gradient, progress, None,
                         full_meta["record_ids"])
            return store.finalize()
    return _compute_multiprocess(Path(out), full_meta, dim, batches, plan, step, placed,
                                 gradient, progress, overwrite, ignore, gather,
                                 gather_chunk_bytes)


GATHERS = ("shared-fs", "network")  # how a multi-process run's rows reach process 0
IGNORED_META = ("package_version", "jax_version")
# A path key of meta and the content fingerprint that stands for it when present.
_PATH_KEYS = {"model": "model_fingerprint", "checkpoint": "lora_fingerprint",
              "adapter": "lora_fingerprint", "data": "data_sha256"}
MAX_BAD_RECORDS = 1000  # stop computing once this many records had non-finite gradients


# Bounded: each entry holds compiled programs; 8 structures cover a run's checkpoints and roles.
@functools.lru_cache(maxsize=8)
def _feature_step(graphdef, gradient: str, projector: Projector, mesh: Mesh):
    """The jitted features program, one per (model structure, gradient type, projection, mesh).

    Cached so that further calls with the same structure (each checkpoint of a run, the pool
    and the validation set, a notebook re-run) reuse the compiled programs instead of tracing a
    fresh closure: about 10 s of compile per length bucket for SmolLM2.
    """
    if gradient == "representation":
        f = representation_fn(graphdef)
    else:
        # Flatten, then project once: projecting leaf by leaf (`Projector.apply_tree`) compiles
        # one loop per LoRA leaf (240 for SmolLM2 on q,k,v,o), measured 77 s of XLA compile
        # against 10 s for one loop over the concatenation; the [B, P] rows exist as gradients.
        f = feature_fn(completion_loss(graphdef), gradient,
                       lambda tree: projector(flatten_per_example(tree)))
    # Rows out sharded like the batch, the finite flags replicated so every process sees (and
    # raises on) a bad row at the same step.
    return jax.jit(f, out_shardings=(sharding.row_sharding(mesh), sharding.replicated(mesh)))


class _Plan(NamedTuple):
    mesh: Mesh
    rows: int  # rows per padded batch: batch_size rounded up to a multiple of the device count

    def padded(self, b: Batch) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The batch's row indices and arrays with padding rows appended: index -1 and zeros in
        every array (all masks zero, like `make_batches`' own padding rows; dropped on output)."""
        extra = self.rows - b.indices.shape[0]
        arrays = {k: np.asarray(v) for k, v in b.arrays().items()}
        if extra == 0:
            return b.indices, arrays
        arrays = {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)])
                  for k, v in arrays.items()}
        return np.concatenate([b.indices, np.full(extra, -1, np.int64)]), arrays

    def place(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: sharding.place_rows(v, self.mesh, self.rows) for k, v in arrays.items()}


def _run_batches(store, batches: list[Batch], plan: _Plan, step, placed, gradient: str,
                 progress: bool, to_local: np.ndarray | None,
                 record_ids: Sequence[str]) -> None:
    """Compute and commit every batch not yet committed by every process.

    `to_local` maps a record index to this process's shard-store row (None: the store is the
    whole store). Each process writes, in one commit per batch, the rows its devices computed.
    """
    def local(idx: np.ndarray) -> np.ndarray:
        return idx if to_local is None else to_local[idx]

    mine = sharding.local_row_positions(plan.mesh, plan.rows)
    pending = []
    for b in batches:
        idx = plan.padded(b)[0][mine]
        idx = idx[idx >= 0]
        pending.append(store is not None and not store.written(local(idx)).all())
    todo_mask = ~sharding.all_processes(~np.array(pending, dtype=bool))
    todo = [b for b, t in zip(batches, todo_mask) if t]
    if len(todo) < len(batches):
        log.info("resuming: %d of %d batches already stored", len(batches) - len(todo),
                 len(batches))
    lora, base, moments = placed
    t0, done = time.perf_counter(), 0
    bad: list[int] = []  # records with non-finite rows: their batches are not stored
    bar = progress_bar(todo, desc=f"{gradient} features", unit="batch",
                       enabled=progress and sharding.is_primary())
    for b in bar:
        indices, arrays = plan.padded(b)
        feats, finite = step(lora, base, plan.place(arrays), moments)
        finite = sharding.to_host(finite)
        real = indices >= 0
        if not finite[real].all():
            bad.extend(int(i) for i in indices[real][~finite[real]])
            if len(bad) >= MAX_BAD_RECORDS:
                break
            continue
        rows_idx, rows = [], []
        for start, block in sharding.addressable_rows(feats):
            keep = indices[start : start + block.shape[0]] >= 0
            rows_idx.append(indices[start : start + block.shape[0]][keep])
            rows.append(block[keep])
        idx = np.concatenate(rows_idx)
        if store is not None and idx.size and not store.written(local(idx)).all():
            store.write(local(idx), np.concatenate(rows))
        done += int(real.sum())
        bar.set_postfix(rec_s=f"{done / (time.perf_counter() - t0):.1f}")
    if bad:
        _raise_non_finite(bad, record_ids)


def _raise_non_finite(bad: list[int], record_ids: Sequence[str]) -> None:
    shown = ", ".join(record_ids[i] for i in bad[:20])
    more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
    stopped = (f"; stopped after {len(bad)} such records" if len(bad) >= MAX_BAD_RECORDS
               else "")
    raise G2ISError(
        f"non-finite gradients for {len(bad)} record(s): {shown}{more}{stopped}. Their batches "
        "were not stored (the others are kept: re-run to resume); check those records and the "
        "checkpoint (a diverged or fp16-overflowing model gives non-finite gradients)")


def shard_dir(out: str | Path, process_id: int, num_processes: int) -> Path:
    """Where process `process_id` of a multi-process run keeps its rows before the merge."""
    return Path(out) / SHARDS / f"process-{process_id:05d}-of-{num_processes:05d}"


SHARDS = "shards"


def _compute_multiprocess(out: Path, full_meta: dict[str, Any], dim: int, batches, plan: _Plan,
                          step, placed, gradient: str, progress: bool, overwrite: bool,
                          ignore: Sequence[str] = IGNORED_META, gather: str = "shared-fs",
                          chunk_bytes: int | None = None) -> Path:
    """Each process commits its rows to its own resumable shard store; after a barrier they
    reach `out` on process 0: merged from the shard folders (``gather="shared-fs"``: needs
    `out` on a file system every process writes to; else copy the shard directories there and
    call `store.merge_shards`), or sent over the network (``"network"``, `_gather_network`)."""
    pid, nproc = jax.process_index(), jax.process_count()
    # Process 0's `out` decides: without a shared file system only it can see the result.
    if sharding.gather_processes(np.int32((out / FEATURES).exists()))[0] and not overwrite:
        raise G2ISError(f"{out} already holds finished features: use them as they are, or "
                        "pass --overwrite to recompute")
    if gather == "network":
        _check_same_meta(full_meta)
    mine = sharding.local_row_positions(plan.mesh, plan.rows)
    rows = np.concatenate([plan.padded(b)[0][mine] for b in batches])
    rows = np.sort(rows[rows >= 0])
    to_local = np.full(len(full_meta["record_ids"]), -1, np.int64)
    to_local[rows] = np.arange(rows.size)
    directory = shard_dir(out, pid, nproc)
    store = None
    if rows.size and (overwrite or not (directory / FEATURES).exists()):
        ids = full_meta["record_ids"]
        shard_meta = {**full_meta, "record_ids": [ids[i] for i in rows],
                      "shard": {"process_id": pid, "num_processes": nproc,
                                "mesh": sharding.mesh_description(plan.mesh),
                                "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}}
        store = open_store(directory, shard_meta, int(rows.size), dim, overwrite=overwrite,
                           ignore=ignore)
        save_shard_rows(directory, rows)
    try:
        _run_batches(store, batches, plan, step, placed, gradient, progress, to_local,
                     full_meta["record_ids"])
        if store is not None:
            store.finalize()
    finally:
        if store is not None:
            store.close()
    sharding.barrier("g2is-features-shards")
    if gather == "network":
        _gather_network(out, full_meta, dim, rows, directory, chunk_bytes)
        return out / FEATURES
    try:
        if sharding.is_primary():
            merge_shards(out, [shard_dir(out, p, nproc) for p in range(nproc)])
    finally:
        sharding.barrier("g2is-features-merged")
    return out / FEATURES


def _check_same_meta(full_meta: dict[str, Any]) -> None:
    """Every process must compute the rows of one configuration (what `merge_shards` checks of
    the shard folders): compare a digest of each process's meta before computing anything."""
    text = json.dumps(full_meta, sort_keys=True).encode()
    digests = sharding.gather_processes(np.frombuffer(hashlib.sha256(text).digest(), np.uint8))
    other = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if other:
        raise G2ISError(f"process(es) {', '.join(map(str, other))} were started with another "
                        "configuration than process 0 (data file, model, checkpoint or adapter, "
                        "options, or package versions differ); start every process with the "
                        "same command on the same files")


def _gather_network(out: Path, full_meta: dict[str, Any], dim: int, rows: np.ndarray,
                    directory: Path, chunk_bytes: int | None) -> None:
    """Send each process's finished shard (on its own disk) to process 0, which writes `out`
    exactly as `merge_shards` would: meta.json is `full_meta` (record ids in row order) and
    the rows go to their offsets. The rows were checked for NaN/Inf when their own process
    committed them; they are not scanned again. The shards are removed once `out` is written."""
    store, reader, error = None, None, None
    try:
        dtype = row_dtype(full_meta.get("dtype") or "float32")
        if rows.size:
            reader = _RowReader(directory / FEATURES, int(rows.size), dim, dtype)
        if sharding.is_primary():
            store = open_store(out, full_meta, len(full_meta["record_ids"]), dim, overwrite=True)
    except Exception as e:  # noqa: BLE001 - every process learns of it before the gather
        error = e
    hint = "the shard stores are kept: fix the cause and re-run the same command"
    try:
        sharding.raise_if_any_failed(error, "preparing to gather the features", hint)
        sink = None if store is None else (
            lambda idx, block: store.write(idx, block, check_finite=False))
        steps = sharding.gather_rows_to_primary(rows, reader.read if reader else _no_rows, sink,
                                                dim=dim, dtype=dtype, chunk_bytes=chunk_bytes)
        error = None
        if store is not None:
            try:
                store.finalize()
            except Exception as e:  # noqa: BLE001 - reported to every process next
                error = e
        sharding.raise_if_any_failed(error, "writing the gathered features", hint)
    finally:
        if store is not None:
            store.close()
        if reader is not None:
            reader.close()
    log.info("features of %d processes gathered to process 0 in %d step(s)",
             jax.process_count(), steps)
    shutil.rmtree(directory, ignore_errors=True)
    sharding.barrier("g2is-features-gathered")  # then the shards/ folder, once empty
    with contextlib.suppress(OSError):
        (out / SHARDS).rmdir()


def _no_rows(start: int, stop: int) -> np.ndarray:
    raise ValueError(f"this process holds no rows, asked for {start}:{stop}")


class _RowReader:
    """Rows of a finished store's features.npy read with plain file reads (no memory map, so
    the pages read do not stay in this process's resident memory)."""

    def __init__(self, path: Path, n: int, dim: int, dtype: np.dtype = np.dtype("<f4")) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            version = np.lib.format.read_magic(self._file)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, header_dtype = read(self._file)
            want = np.dtype(dtype)
        except (ValueError, OSError) as e:
            self._file.close()
            raise G2ISError(f"cannot read {path} ({e}); re-run with --overwrite") from None
        # A bfloat16 file's header says "<V2" (np.save of an ml_dtypes array): same item size.
        same = header_dtype == want or (want.itemsize == 2 and header_dtype == np.dtype("V2"))
        if shape != (n, dim) or fortran or not same:
            self._file.close()
            raise G2ISError(f"{path} holds {shape} {header_dtype}, not this run's {n}x{dim} "
                            f"{want} rows; re-run with --overwrite")
        self._offset, self._dim, self._dtype = self._file.tell(), dim, want

    def read(self, start: int, stop: int) -> np.ndarray:
        self._file.seek(self._offset + start * self._dim * self._dtype.itemsize)
        rows = np.fromfile(self._file, dtype=self._dtype, count=(stop - start) * self._dim)
        if rows.size != (stop - start) * self._dim:
            raise G2ISError(f"{self._file.name} is truncated; re-run with --overwrite")
        return rows.reshape(stop - start, self._dim)

    def close(self) -> None:
        self._file.close()
