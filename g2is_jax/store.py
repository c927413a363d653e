"""The on-disk feature store: ``DIR/features.npy`` (N×d float32 or bfloat16) and ``DIR/meta.json``.

Design
------
The caller (``g2is grads``) computes rows in batches of its own fixed plan and hands each batch to
``FeatureStore.write``; a run killed at any moment (``kill -9``) and started again with the same
config resumes, and the finished ``features.npy`` is byte-identical to an uninterrupted run's.

While running, DIR holds

* ``meta.json``: the caller's meta plus ``n``, ``dim``, ``dtype`` and ``store_format``; written
  first (temp file, fsync, rename) and compared key by key on every resume, so a changed data
  file, model, checkpoint, gradient type, projection, seed, dim, N or record-id list is refused
  instead of mixed in;
* ``features.partial.npy``: the final file at its final size (npy header + N×d rows, created
  sparse via temp + rename); ``write`` puts rows at their offsets with ``pwrite``;
* ``rows.journal``: an append-only log with one checksummed record per ``write`` (a row range or
  an index list). A batch is committed by: rows written, data fsynced, record appended, journal
  fsynced. A kill before the record is complete leaves the batch uncommitted: its rows count as
  missing (a torn record fails its CRC and is cut off on resume) and are rewritten in full;
* ``.lock``: an ``flock`` held by the writing process (released by the kernel on kill -9).

``finalize`` checks every row is committed, fsyncs, renames the partial file to ``features.npy``
(the commit point: a store is finished iff ``features.npy`` exists) and removes the journal.

Why one preallocated file and a journal rather than one temp+rename chunk file per batch: at
10^7 rows a per-batch chunk design makes 10^5-10^6 files and a second full copy at assembly
(hundreds of GB at d = 8192); here the data is written once, in place, and finishing is a rename.
The crash guarantee is the same: a batch is durable once its journal record is.

Rows are float32 (the default) or bfloat16 (``dtype``: half the disk and reading time of the
walk; rounded to nearest-even from the float32 rows), and not normalised. A bfloat16 file is what
``np.save`` writes for an ``ml_dtypes.bfloat16`` array (descr ``<V2``; `read_features` reads it
back as bfloat16). Non-finite rows are refused with their record ids and nothing of that batch
is stored, so the store stays resumable.

Reading
-------
`read_features` is the one reader of feature sets (a store directory or a bare ``.npy``): it
returns a `FeatureSet`, the array (memory-mapped) and its `FeatureMeta`, the schema of
meta.json, validated on read and on write. `write_features` writes a whole array as a finished
store; `file_sha256` is the one file hash of the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import struct
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from g2is_jax.errors import G2ISError
from g2is_jax.io import atomic_write, fsync_dir, make_dir, os_error

try:  # POSIX advisory lock; elsewhere the store runs unlocked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FEATURES = "features.npy"
META = "meta.json"
PARTIAL = "features.partial.npy"
JOURNAL = "rows.journal"
LOCK = ".lock"
STORE_FORMAT = 1
DTYPE = np.dtype("<f4")  # the default row dtype
STORE_DTYPES = ("float32", "bfloat16")  # what a store writes (`open_store(dtype=...)`)
STORE_KEYS = ("n", "dim", "dtype", "store_format")  # written by the store into meta.json

# Journal record: magic, kind (0: rows [start, start + count); 1: `count` int64 indices follow),
# count, start, CRC32 of the header fields and payload.
_MAGIC = b"G2SJ"
_HEAD = struct.Struct("<4sIQQI")
_RANGE, _LIST = 0, 1


# ----------------------------------------------------------------------------- small helpers


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks: the project's one file hash (data files,
    model files in `g2is_jax.fingerprint`, feature stores)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk_bytes):
                digest.update(block)
    except OSError as e:
        raise G2ISError(f"cannot hash {path}: {e.strerror or e}") from e
    return digest.hexdigest()


_fsync_dir = fsync_dir


def row_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a store's rows: little-endian float32, or ml_dtypes' bfloat16."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name == "float32":
        return DTYPE
    raise G2ISError(f"feature dtype must be one of {', '.join(STORE_DTYPES)}, got {name!r}")


def _npy_header(n: int, dim: int, dtype: np.dtype = DTYPE) -> bytes:
    """The exact header ``np.save`` writes for a C-order (n, dim) array of `dtype`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": (n, dim)}
    )
    return buf.getvalue()


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _diff(old: Any, new: Any, key: str) -> list[str]:
    """Human-readable differences between a stored and a requested meta value."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            sub = f"{key}.{k}" if key else k
            if k not in old:
                out.append(f"{sub}: absent in the store, now {_short(new[k])}")
            elif k not in new:
                out.append(f"{sub}: {_short(old[k])} in the store, now absent")
            else:
                out.extend(_diff(old[k], new[k], sub))
        return out
    if old == new:
        return []
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{key}: {len(old)} items in the store, {len(new)} now"]
        i = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
        return [f"{key}: item {i} is {_short(old[i])} in the store, {_short(new[i])} now"]
    if key in FINGERPRINT_KEYS and isinstance(old, str) and isinstance(new, str):
        return [f"{FINGERPRINT_KEYS[key]} changed ({key} {old[:12]} in the store, "
                f"{new[:12]} now)"]
    return [f"{key}: {_short(old)} in the store, {_short(new)} now"]


# ----------------------------------------------------------------------------- journal


def _encode(kind: int, count: int, start: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<IQQ", kind, count, start)))
    return _HEAD.pack(_MAGIC, kind, count, start, crc) + payload


def _read_journal(path: Path, n: int) -> tuple[np.ndarray, int]:
    """Rows committed by the journal (bool mask of n) and the byte length of its valid prefix."""
    done = np.zeros(n, dtype=bool)
    if not path.exists():
        return done, 0
    data = path.read_bytes()
    pos = 0
    while pos + _HEAD.size <= len(data):
        magic, kind, count, start, _crc = _HEAD.unpack_from(data, pos)
        size = _HEAD.size + (8 * count if kind == _LIST else 0)
        if magic != _MAGIC or kind not in (_RANGE, _LIST) or pos + size > len(data):
            break
        payload = data[pos + _HEAD.size : pos + size]
        if _encode(kind, count, start, payload)[: _HEAD.size] != data[pos : pos + _HEAD.size]:
            break  # torn or corrupt: everything from here on is uncommitted
        if kind == _RANGE:
            if start + count > n:
                break
            done[start : start + count] = True
        else:
            idx = np.frombuffer(payload, dtype="<i8")
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                break
            done[idx] = True
        pos += size
    return done, pos


# ----------------------------------------------------------------------------- the writer


class FeatureStore:
    """An open, locked, resumable store; made by ``open_store``. Not thread-safe."""

    def __init__(self, directory: Path, meta: dict[str, Any], lock_fd: int | None) -> None:
        self.directory = directory
        self.meta = meta
        self.n = int(meta["n"])
        self.dim = int(meta["dim"])
        self.dtype = row_dtype(meta.get("dtype", "float32"))
        self._lock_fd = lock_fd
        self._offset = len(_npy_header(self.n, self.dim, self.dtype))
        self._done, valid = _read_journal(directory / JOURNAL, self.n)
        self._journal = open(directory / JOURNAL, "ab")  # noqa: SIM115 - closed by close()
        if self._journal.tell() != valid:  # cut a torn tail off before appending after it
            self._journal.truncate(valid)
            os.fsync(self._journal.fileno())
        self._data_fd = os.open(directory / PARTIAL, os.O_WRONLY)

    # -- state

    @property
    def num_written(self) -> int:
        """Rows committed so far."""
        return int(self._done.sum())

    def missing(self) -> np.ndarray:
        """Sorted int64 indices of the rows still to compute."""
        return np.flatnonzero(~self._done).astype(np.int64)

    def is_complete(self) -> bool:
        return bool(self._done.all())

    def written(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Bool mask: which of ``rows`` are committed. A batch is all or nothing, so a caller
        following its fixed plan skips a batch when ``written(batch).all()``."""
        return self._done[np.asarray(rows, dtype=np.int64)]

    def record_ids(self, rows: Sequence[int]) -> list[str]:
        """Record ids of rows (meta's ``record_ids``, else ``row <i>``), for messages."""
        ids = self.meta.get("record_ids")
        return [str(ids[i]) if ids is not None else f"row {i}" for i in rows]

    # -- writing

    def write(self, where: int | Sequence[int] | np.ndarray, rows: Any, *,
              check_finite: bool = True) -> None:
        """Commit rows: ``write(start, rows)`` for rows start.., or ``write(indices, rows)``.

        ``rows`` is (k, dim), cast to float32, then to the store's dtype. Non-finite rows (also
        those that overflow the cast) raise G2ISError naming their record ids, and nothing of the
        batch is stored. Rows already committed are refused. ``check_finite=False`` skips that
        scan, only for rows a store already checked where they were computed (process 0 writing
        the rows every process sent it, `g2is_jax.featurize`).
        """
        self._check_open()
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf: refused below
            rows = np.ascontiguousarray(np.asarray(rows, dtype=np.float32), dtype=DTYPE)
            if self.dtype != DTYPE:
                rows = rows.astype(self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows must have shape (k, {self.dim}), got {rows.shape}")
        k = rows.shape[0]
        if np.ndim(where) == 0:
            start = int(where)  # type: ignore[arg-type]
            if not 0 <= start <= self.n - k:
                raise ValueError(f"rows [{start}, {start + k}) are outside [0, {self.n})")
            idx = np.arange(start, start + k, dtype=np.int64)
        else:
            idx = np.asarray(where, dtype=np.int64)
            if idx.shape != (k,):
                raise ValueError(f"{k} rows need {k} indices, got shape {idx.shape}")
            if k and (idx.min() < 0 or idx.max() >= self.n):
                raise ValueError(f"row indices must lie in [0, {self.n})")
            if np.unique(idx).size != k:
                raise ValueError("row indices must be distinct")
        if k == 0:
            return
        if self._done[idx].any():
            raise ValueError(
                f"rows already written: {idx[self._done[idx]][:10].tolist()}; "
                "write only rows from store.missing()"
            )
        bad = (np.flatnonzero(~np.isfinite(rows.astype(np.float32, copy=False)).all(axis=1))
               if check_finite else np.empty(0, np.int64))
        if bad.size:
            names = ", ".join(
                f"{rid} (row {i})" for rid, i in zip(self.record_ids(idx[bad][:20]), idx[bad][:20])
            )
            more = f" and {bad.size - 20} more" if bad.size > 20 else ""
            raise G2ISError(
                f"non-finite features (NaN/Inf) for {bad.size} record(s): {names}{more}. "
                "Nothing from this batch was stored; the store stays resumable. Check those "
                "records and the checkpoint (a diverged or fp16-overflowing model gives "
                "non-finite gradients)."
            )
        if np.ndim(where) == 0:
            record = _encode(_RANGE, k, int(idx[0]), b"")
        else:
            record = _encode(_LIST, k, 0, idx.astype("<i8").tobytes())
        committed = self._journal.tell()
        try:
            self._write_rows(idx, rows)
            self._journal.write(record)
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as e:  # e.g. a full disk: the batch is not committed, the rest is kept
            with contextlib.suppress(OSError):  # drop a partly appended record, if any
                self._journal.seek(committed)
                self._journal.truncate(committed)
            with contextlib.suppress(OSError):  # unusable now: a re-open checks the journal
                self.close()
            raise G2ISError(f"{os_error(self.directory, e)}; the rows committed so far are "
                            "kept: re-run the same command to resume") from None
        self._done[idx] = True

    def _write_rows(self, idx: np.ndarray, rows: np.ndarray) -> None:
        # pwrite each run of consecutive rows at once, in the order given and from the array's
        # own memory (no sorted copy: a gather step's rows come interleaved by process), then
        # make the data durable.
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        row_bytes = self.dim * self.dtype.itemsize
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, idx.size]):
            # As bytes: the buffer protocol has no bfloat16 format ("E" is refused).
            buf = memoryview(np.ascontiguousarray(rows[lo:hi]).view(np.uint8)).cast("B")
            pos = self._offset + int(idx[lo]) * row_bytes
            while buf:
                wrote = os.pwrite(self._data_fd, buf, pos)
                buf, pos = buf[wrote:], pos + wrote
        os.fsync(self._data_fd)

    def finalize(self) -> Path:
        """Publish ``features.npy`` (atomic rename) once every row is committed; close."""
        self._check_open()
        if not self.is_complete():
            raise G2ISError(
                f"incomplete: {self.num_written}/{self.n} rows in {self.directory}; "
                "write the missing rows (store.missing()) before finalize()"
            )
        os.fsync(self._data_fd)
        os.replace(self.directory / PARTIAL, self.directory / FEATURES)
        _fsync_dir(self.directory)
        self.close()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / JOURNAL).unlink()
        _fsync_dir(self.directory)
        return self.directory / FEATURES

    # -- lifetime

    def close(self) -> None:
        """Release files and the lock; committed rows stay for a later resume."""
        if self._journal is None:
            return
        self._journal.close()
        os.close(self._data_fd)
        self._journal = None  # type: ignore[assignment]
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None

    def _check_open(self) -> None:
        if self._journal is None:
            raise ValueError(f"the feature store {self.directory} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- opening


def _lock(directory: Path) -> int | None:
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise G2ISError(
            f"another process is writing the feature store {directory}; wait for it to finish "
            "or stop it (a killed run releases the lock), or choose another --out"
        ) from None
    return fd


def _full_meta(meta: dict[str, Any], n: int, dim: int, dtype: str = "float32"
               ) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:  # the stored form: what a later run reads back and compares against
        full = json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serialisable (no NaN): {e}") from e
    own = {"n": n, "dim": dim, "dtype": dtype, "store_format": STORE_FORMAT}
    for key, value in own.items():
        if key in full and full[key] != value:
            raise G2ISError(f"meta[{key!r}] = {full[key]!r} contradicts the store's {value!r}")
        full.pop(key, None)
    full.update(own)  # the store's keys last, in one order: meta.json's bytes do not depend on
    # whether the caller's meta already named them (one-process write vs shard merge vs gather)
    ids = full.get("record_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != n):
        got = len(ids) if isinstance(ids, list) else type(ids).__name__
        raise G2ISError(f"meta['record_ids'] must list one id per row: n = {n}, got {got}")
    FeatureMeta.from_json(full, "meta")  # what is written must read back
    return full


def _create_partial(directory: Path, n: int, dim: int, dtype: np.dtype) -> None:
    header = _npy_header(n, dim, dtype)
    tmp = directory / (PARTIAL + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.truncate(len(header) + n * dim * dtype.itemsize)  # sparse: unwritten rows read as 0
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / PARTIAL)
    _fsync_dir(directory)


def _check_partial(directory: Path, n: int, dim: int, dtype: np.dtype) -> None:
    header = _npy_header(n, dim, dtype)
    path = directory / PARTIAL
    with open(path, "rb") as f:
        ok = f.read(len(header)) == header
    if not ok or path.stat().st_size != len(header) + n * dim * dtype.itemsize:
        raise G2ISError(
            f"{path} does not have the size or header of a {n}x{dim} {dtype.name} store "
            "(damaged?); "
            "re-run with --overwrite to start again"
        )


def _remove_store_files(directory: Path) -> None:
    for name in (FEATURES, PARTIAL, PARTIAL + ".tmp", JOURNAL, META, META + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    _fsync_dir(directory)


def open_store(
    directory: str | os.PathLike[str],
    meta: dict[str, Any],
    n: int,
    dim: int,
    *,
    overwrite: bool = False,
    ignore: Collection[str] = (),
    dtype: str | None = None,
) -> FeatureStore:
    """Create, or resume, the store in ``directory`` for ``n`` rows of ``dim`` features, stored
    as ``dtype`` ("float32" or "bfloat16", recorded in meta.json like ``n`` and ``dim``; None:
    ``meta["dtype"]`` if given, else float32).

    ``meta`` must be JSON-serialisable; on resume it must equal the stored meta.json in every
    key except those in ``ignore`` (e.g. a timestamp), else a G2ISError lists the differences.
    A finished store is refused unless ``overwrite``, which discards everything in the store.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise G2ISError(f"a feature store needs n > 0 rows, got {n!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise G2ISError(f"a feature store needs dim > 0, got {dim!r}")
    if dtype is None:
        dtype = meta.get("dtype", "float32") if isinstance(meta, dict) else "float32"
    rows_dtype = row_dtype(dtype)
    full = _full_meta(meta, n, dim, dtype)
    directory = make_dir(directory)
    try:
        lock_fd = _lock(directory)
    except OSError as e:
        raise os_error(directory / LOCK, e) from None
    try:
        if overwrite:
            _remove_store_files(directory)
        _reconcile(directory, full, set(ignore))
        if not (directory / PARTIAL).exists():
            _done, valid = _read_journal(directory / JOURNAL, n)
            if valid:
                raise G2ISError(
                    f"{directory} has a journal of written rows but no {PARTIAL} (damaged?); "
                    "re-run with --overwrite to start again"
                )
            _create_partial(directory, n, dim, rows_dtype)
        _check_partial(directory, n, dim, rows_dtype)
        stored = json.loads((directory / META).read_text())
        return FeatureStore(directory, stored, lock_fd)
    except BaseException as e:
        if lock_fd is not None:
            os.close(lock_fd)
        if isinstance(e, OSError):
            raise os_error(directory, e) from None
        raise


def _reconcile(directory: Path, full: dict[str, Any], ignore: set[str]) -> None:
    """Write meta.json for a new store; for an existing one, refuse a different or finished one."""
    meta_path = directory / META
    if not meta_path.exists():
        leftovers = [p for p in (FEATURES, PARTIAL, JOURNAL) if (directory / p).exists()]
        if leftovers:
            raise G2ISError(
                f"{directory} holds {', '.join(leftovers)} but no {META}: not a store this "
                "program can resume; choose a new --out, or --overwrite to discard it"
            )
        atomic_write(meta_path, json.dumps(full, indent=1).encode())
        return
    try:
        stored = _read_meta_json(meta_path)
        FeatureMeta.from_json(stored, meta_path)
    except G2ISError as e:
        raise G2ISError(f"{e} (or pass --overwrite to start again)") from None
    diffs = _diff(
        {k: v for k, v in stored.items() if k not in ignore},
        {k: v for k, v in full.items() if k not in ignore},
        "",
    )
    if diffs:
        diffs.sort(key=lambda d: not d.endswith(" now)"))  # what changed in content first
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise G2ISError(
            f"{directory} holds features for a different input or configuration ({shown}); "
            "refusing to mix them: write to a new --out directory, or pass --overwrite to "
            "discard the stored features"
        )
    if (directory / FEATURES).exists():
        for stale in (PARTIAL, JOURNAL):  # left by a kill between finishing and cleaning up
            with contextlib.suppress(FileNotFoundError):
                (directory / stale).unlink()
        raise G2ISError(
            f"{directory} already holds finished features ({full['n']}x{full['dim']}) for this "
            "configuration: use them as they are, or pass --overwrite to recompute"
        )


# ----------------------------------------------------------------------------- the feature set


GRADIENTS = ("sgd", "adam", "sign", "representation")
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_CHECK_ROWS = 16384  # rows read at a time when scanning a memory-mapped file
_MAX_NAMED = 20  # bad records named in a message; the rest are counted
# What a fingerprint key covers, for messages that say what changed.
FINGERPRINT_KEYS = {
    "model_fingerprint": "the model's weights and config",
    "tokenizer_fingerprint": "the tokenizer",
    "lora_fingerprint": "the LoRA adapter weights (checkpoint/adapter)",
    "moments_fingerprint": "the checkpoint's Adam moments",
    "data_sha256": "the data file's content",
}


def _schema_error(where: Any, key: str, want: str, got: Any) -> G2ISError:
    return G2ISError(f"{where}: {key!r} must be {want}, got {_short(got, 40)}; the meta.json is "
                     "damaged or not from g2is: recompute the features (g2is grads --overwrite)")


def _int_field(doc: Mapping[str, Any], key: str, where: Any, *, low: int,
               required: bool) -> int | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise _schema_error(where, key, f"an integer ≥ {low}", "nothing")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _schema_error(where, key, f"an integer ≥ {low}", value)
    return value


def _str_field(doc: Mapping[str, Any], key: str, where: Any,
               choices: Sequence[str] | None = None) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or (choices is not None and value not in choices):
        want = f"one of {', '.join(choices)}" if choices else "a string"
        raise _schema_error(where, key, want, value)
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureMeta(Mapping[str, Any]):
    """The typed metadata of a feature set (the schema of ``meta.json``).

    Typed fields are validated on read (`from_json`); every other key of the file is kept in
    `extra`. It is also a read-only mapping over the JSON form (``meta["checkpoint_lr"]``,
    ``meta.get("gradient")``), so code written against the plain dict keeps working. A typed
    field that is None reads as absent.
    """

    n: int
    dim: int
    dtype: str = "float32"
    gradient: str | None = None  # one of GRADIENTS
    record_ids: tuple[str, ...] | None = None
    checkpoint_lr: float | None = None
    checkpoint_epoch: int | None = None
    data_sha256: str | None = None
    projection: Mapping[str, Any] | None = None
    model_fingerprint: str | None = None
    tokenizer_fingerprint: str | None = None
    lora_fingerprint: str | None = None
    moments_fingerprint: str | None = None
    store_format: int | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The keys of the file it was read from, in order (null values included): the mapping view
    # and `to_json` give back that document, so a read-modify-write keeps meta.json's bytes.
    keys_read: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    @classmethod
    def from_json(cls, doc: Any, where: Any = "meta") -> FeatureMeta:
        """Validate a parsed meta.json; a G2ISError names the file, the key and the fix."""
        if not isinstance(doc, Mapping):
            raise G2ISError(f"{where} must hold a JSON object, got {type(doc).__name__}; "
                            "recompute the features (g2is grads --overwrite)")
        n = _int_field(doc, "n", where, low=0, required=True)
        ids = doc.get("record_ids")
        if ids is not None:
            if not isinstance(ids, list) or not all(
                    isinstance(i, str | int) and not isinstance(i, bool) for i in ids):
                raise _schema_error(where, "record_ids", "a list of strings", ids)
            if len(ids) != n:
                raise G2ISError(f"{where} lists {len(ids)} record_ids but n={n}; the store is "
                                "damaged or mixed: recompute it (g2is grads --overwrite)")
            ids = tuple(str(i) for i in ids)
        lr = doc.get("checkpoint_lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float)
                               or not math.isfinite(lr) or lr < 0):
            raise _schema_error(where, "checkpoint_lr", "a finite number ≥ 0 or null", lr)
        projection = doc.get("projection")
        if projection is not None and not isinstance(projection, Mapping):
            raise _schema_error(where, "projection", "an object", projection)
        typed = {f.name for f in dataclasses.fields(cls)} - {"extra", "keys_read"}
        return cls(
            n=n,
            dim=_int_field(doc, "dim", where, low=1, required=True),
            dtype=_str_field(doc, "dtype", where, FLOAT_DTYPES) or "float32",
            gradient=_str_field(doc, "gradient", where, GRADIENTS),
            record_ids=ids,
            checkpoint_lr=None if lr is None else float(lr),
            checkpoint_epoch=_int_field(doc, "checkpoint_epoch", where, low=0, required=False),
            data_sha256=_str_field(doc, "data_sha256", where),
            projection=None if projection is None else dict(projection),
            model_fingerprint=_str_field(doc, "model_fingerprint", where),
            tokenizer_fingerprint=_str_field(doc, "tokenizer_fingerprint", where),
            lora_fingerprint=_str_field(doc, "lora_fingerprint", where),
            moments_fingerprint=_str_field(doc, "moments_fingerprint", where),
            store_format=_int_field(doc, "store_format", where, low=1, required=False),
            extra={k: v for k, v in doc.items() if k not in typed},
            keys_read=tuple(doc),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form: the document read (same keys, same order), or for a FeatureMeta built
        in code its typed fields that are not None, then `extra`."""
        return {k: self[k] for k in self._keys()}

    # -- the read-only mapping view
    def _keys(self) -> list[str]:
        if self.keys_read:
            return list(self.keys_read)
        names = [n for n in self._typed() if getattr(self, n) is not None]
        return names + [k for k in self.extra if k not in names]

    @classmethod
    def _typed(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "keys_read")]

    def __getitem__(self, key: str) -> Any:
        if key in self._typed():
            value = getattr(self, key)
            if value is None and key not in self.keys_read:
                raise KeyError(key)
            return list(value) if key == "record_ids" and value is not None else value
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """A feature matrix (rows × dim; possibly memory-mapped, read-only) and its typed meta."""

    array: np.ndarray
    meta: FeatureMeta
    source: str

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    @property
    def record_ids(self) -> list[str] | None:
        ids = self.meta.record_ids
        return None if ids is None else list(ids)

    def row_names(self, rows: Sequence[int]) -> list[str]:
        """``"<record id> (row i)"`` (or ``"row i"``) for messages."""
        ids = self.meta.record_ids
        return [f"{ids[i]} (row {i})" if ids is not None else f"row {i}" for i in rows]


def _read_meta_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise G2ISError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise G2ISError(f"{path} is not UTF-8 text; recompute the features "
                        "(g2is grads --overwrite)") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise G2ISError(f"{path} is nested too deeply to be a meta.json; recompute the "
                        "features (g2is grads --overwrite)") from None
    except ValueError as e:
        raise G2ISError(f"{path} is not valid JSON ({e}); recompute the features "
                        "(g2is grads --overwrite)") from None


def _npy_dtype(descr: np.dtype) -> np.dtype:
    """The dtype to read: a 2-byte void is how NumPy records ml_dtypes' bfloat16."""
    if descr.kind == "V" and descr.itemsize == 2 and descr.fields is None:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return descr


def _open_npy(path: Path, role: str, *, mmap: bool) -> np.ndarray:
    """A `.npy` file's array, checked from its header before any data is read."""
    fix = "recompute the features"
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise G2ISError(f"{path} is not a .npy array file (no NumPy header: damaged, or "
                                f"another format); {fix}")
            f.seek(0)
            try:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran, descr = read(f, max_header_size=1 << 20)
            except (ValueError, SyntaxError, TypeError, OverflowError) as e:
                raise G2ISError(f"{path} has a damaged .npy header ({e}); {fix}") from None
            offset = f.tell()
        size = path.stat().st_size
    except OSError as e:
        raise G2ISError(f"cannot read {path}: {e.strerror or e}") from None
    if descr.hasobject:
        raise G2ISError(f"{path}: {role} features must be floating point, got Python objects "
                        f"(pickled data); {fix}")
    dtype = _npy_dtype(descr)
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise G2ISError(f"{path}: {role} features must be floating point, got {descr}; {fix}")
    if len(shape) != 2:
        raise G2ISError(f"{path}: {role} features must be 2-D (rows × dim), got shape {shape}")
    if shape[0] == 0:
        raise G2ISError(f"{path}: {role} features have no rows; the {role} set must not be empty")
    want = offset + int(np.prod(shape)) * dtype.itemsize
    if size < want:
        raise G2ISError(f"{path} is truncated ({size} of {want} bytes for {shape[0]}x{shape[1]} "
                        f"{dtype.name}); {fix}")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise G2ISError(f"cannot read {path} as a .npy array ({e}); {fix}") from None
    if fortran:  # np.load gives a transposed view; rows must be contiguous for chunked reads
        arr = np.ascontiguousarray(arr)
    return arr.view(dtype) if arr.dtype != dtype else arr


def _check(fs: FeatureSet, role: str, check_finite: bool) -> None:
    arr, meta, src = fs.array, fs.meta, fs.source
    if meta.n != arr.shape[0]:
        raise G2ISError(f"{src}: meta.json says n={meta.n} but features.npy has {arr.shape[0]} "
                        "rows; the store is incomplete or mixed: re-run `g2is grads`")
    if meta.dim != arr.shape[1]:
        raise G2ISError(f"{src}: meta.json says dim={meta.dim} but features.npy has "
                        f"{arr.shape[1]} columns; re-run `g2is grads`")
    if not check_finite:
        return
    bad: list[int] = []
    count = 0
    for s in range(0, arr.shape[0], _CHECK_ROWS):
        chunk = np.asarray(arr[s : s + _CHECK_ROWS], dtype=np.float32)
        rows = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        count += rows.size
        bad.extend((s + rows[: _MAX_NAMED - len(bad)]).tolist())
    if count:
        more = f" and {count - len(bad)} more" if count > len(bad) else ""
        raise G2ISError(f"{src}: {role} features have NaN or Inf in {count} row(s): "
                        f"{', '.join(fs.row_names(bad))}{more}; recompute them (a diverged "
                        "checkpoint?) or drop those records")


def read_features(path: str | os.PathLike[str], *, role: str = "features", mmap: bool = True,
                  check_finite: bool = True) -> FeatureSet:
    """The one reader: a feature-store directory (``features.npy`` + ``meta.json``) or a bare
    ``.npy`` file (N×d; meta: n and dim only) as a `FeatureSet`.

    The meta is validated against `FeatureMeta`'s schema and against the array; with
    `check_finite` every row is scanned (in chunks) and all non-finite rows are reported by
    record id. float16/32/64 and bfloat16 arrays are read as stored; `mmap` maps the file
    read-only. `role` ("train", "validation", ...) names the set in messages.
    """
    p = Path(path)
    if p.is_dir():
        meta_path, npy = p / META, p / FEATURES
        doc = _read_meta_json(meta_path) if meta_path.is_file() else None
        meta = None if doc is None else FeatureMeta.from_json(doc, meta_path)
        if not npy.is_file():
            if meta is not None and ((p / PARTIAL).exists() or (p / JOURNAL).exists()):
                done, _ = _read_journal(p / JOURNAL, meta.n)
                hint = ("all rows are written; re-run the same command to finish" if done.all()
                        else "re-run the same command to resume")
                raise G2ISError(f"incomplete feature store {p}: {int(done.sum())}/{meta.n} "
                                f"rows; {hint}")
            raise G2ISError(f"{p} has no features.npy: not a finished feature store; compute "
                            "it with `g2is grads --out` (or re-run it to finish)")
        arr = _open_npy(npy, role, mmap=mmap)
        if meta is None:
            meta = FeatureMeta(n=int(arr.shape[0]), dim=int(arr.shape[1]),
                               dtype=_dtype_name(arr))
    elif p.is_file():
        if p.suffix != ".npy":
            raise G2ISError(f"{p}: {role} features must be a .npy file or a feature-store "
                            "directory")
        arr = _open_npy(p, role, mmap=mmap)
        meta = FeatureMeta(n=int(arr.shape[0]), dim=int(arr.shape[1]), dtype=_dtype_name(arr))
    else:
        raise G2ISError(f"no feature store at {p}: {role} features not found (expected a .npy "
                        "file or a feature-store directory from `g2is grads`)")
    fs = FeatureSet(arr, meta, str(p))
    _check(fs, role, check_finite)
    return fs


def _dtype_name(arr: np.ndarray) -> str:
    name = np.dtype(arr.dtype).name
    return name if name in FLOAT_DTYPES else "float32"


def write_features(directory: str | os.PathLike[str], array: Any, meta: Mapping[str, Any],
                   *, overwrite: bool = False, chunk_rows: int = 65536,
                   dtype: str = "float32") -> Path:
    """The one-shot writer: ``array`` (N×d) and ``meta`` as a finished store of `dtype` rows in
    `directory` (through `open_store`, so the result is what `g2is grads` writes); returns
    features.npy."""
    arr = np.asarray(array) if not isinstance(array, np.ndarray) else array
    if arr.ndim != 2:
        raise G2ISError(f"features must be 2-D (rows × dim), got shape {arr.shape}")
    doc = meta.to_json() if isinstance(meta, FeatureMeta) else dict(meta)
    for key in STORE_KEYS:
        doc.pop(key, None)
    with open_store(directory, doc, int(arr.shape[0]), int(arr.shape[1]),
                    overwrite=overwrite, dtype=dtype) as store:
        for s in range(0, arr.shape[0], chunk_rows):
            store.write(s, arr[s : s + chunk_rows])
        return store.finalize()


def load_features(
    directory: str | os.PathLike[str], *, mmap: bool = False
) -> tuple[np.ndarray, FeatureMeta]:
    """``(features (N, d), meta)`` of a finished store: `read_features` without the finite scan
    (the store refused non-finite rows when they were written)."""
    fs = read_features(directory, mmap=mmap, check_finite=False)
    return fs.array, fs.meta


# ----------------------------------------------------------------------------- shards


SHARD_ROWS = "rows.npy"  # in a shard store: the merged store's row of each of its rows
SHARD_KEY = "shard"  # a shard store's meta key describing its place in the run


def save_shard_rows(directory: str | os.PathLike[str], rows: np.ndarray) -> None:
    """Record, next to a shard store, which rows of the merged store its rows are."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(rows, dtype="<i8"), allow_pickle=False)
    atomic_write(Path(directory) / SHARD_ROWS, buf.getvalue())


def merge_shards(out: str | os.PathLike[str], shard_dirs: Sequence[str | os.PathLike[str]],
                 *, chunk_rows: int = 4096, remove: bool = True) -> Path:
    """Merge finished shard stores (each one process's rows of a multi-process run, with its
    ``rows.npy``) into one finished store in `out`, identical to a single-process run's.

    The merged meta.json is the shards' common meta with the record ids put back in row order.
    The shards must cover every row exactly once and agree on everything else; `remove` deletes
    them once the merged store is published. Any previous store in `out` is replaced.
    """
    if not shard_dirs:
        raise G2ISError("no shard stores to merge")
    parts = []
    for d in map(Path, shard_dirs):
        feats, meta = load_features(d, mmap=True)
        try:
            rows = np.load(d / SHARD_ROWS, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise G2ISError(f"cannot read {d / SHARD_ROWS} ({e}); recompute that shard") from e
        if rows.shape != (feats.shape[0],):
            raise G2ISError(f"{d / SHARD_ROWS} lists {rows.shape[0]} rows for "
                            f"{feats.shape[0]} features; recompute that shard")
        parts.append((d, feats, meta, rows.astype(np.int64)))

    def common(meta: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in meta.items()
                if k not in (*STORE_KEYS, SHARD_KEY, "record_ids")}

    first = common(parts[0][2])
    n = sum(p[1].shape[0] for p in parts)
    seen = np.zeros(n, dtype=bool)
    ids: list[Any] = [None] * n
    for d, feats, meta, rows in parts:
        diffs = _diff(first, common(meta), "")
        if diffs:
            raise G2ISError(f"shard {d} was computed with another configuration than "
                            f"{parts[0][0]} ({'; '.join(diffs[:4])}); merge the shards of one "
                            "run only")
        if rows.size and (rows.min() < 0 or rows.max() >= n or seen[rows].any()):
            raise G2ISError(f"shard {d} holds rows outside 0..{n - 1} or rows another shard "
                            "holds; merge the shards of one run only")
        seen[rows] = True
        if meta.get("record_ids") is not None:
            for r, rid in zip(rows, meta["record_ids"]):
                ids[r] = rid
    meta = dict(parts[0][2])
    for k in (*STORE_KEYS, SHARD_KEY):
        meta.pop(k, None)
    if "record_ids" in meta:
        meta["record_ids"] = ids
    with open_store(out, meta, n, int(parts[0][1].shape[1]), overwrite=True,
                    dtype=parts[0][2].get("dtype", "float32")) as store:
        for _, feats, _, rows in parts:
            for s in range(0, rows.size, chunk_rows):
                store.write(rows[s : s + chunk_rows], feats[s : s + chunk_rows])
        path = store.finalize()
    if remove:
        for d, *_ in parts:
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(parts[0][0]).parent.rmdir()  # the shards/ folder, once empty
    return path
