"""The on-disk feature store: ``DIR/features.npy`` (N×d float32) and ``DIR/meta.json``.

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
* ``features.partial.npy``: the final file at its final size (npy header + N×d float32, created
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

Rows are float32 and not normalised. Non-finite rows are refused with their record ids and
nothing of that batch is stored, so the store stays resumable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from g2is_jax.errors import G2ISError

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
DTYPE = np.dtype("<f4")
STORE_KEYS = ("n", "dim", "dtype", "store_format")  # written by the store into meta.json

# Journal record: magic, kind (0: rows [start, start + count); 1: `count` int64 indices follow),
# count, start, CRC32 of the header fields and payload.
_MAGIC = b"G2SJ"
_HEAD = struct.Struct("<4sIQQI")
_RANGE, _LIST = 0, 1


# ----------------------------------------------------------------------------- small helpers


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk_bytes):
                digest.update(block)
    except OSError as e:
        raise G2ISError(f"cannot hash {path}: {e.strerror or e}") from e
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _npy_header(n: int, dim: int) -> bytes:
    """The exact header ``np.save`` writes for a C-order (n, dim) float32 array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": DTYPE.str, "fortran_order": False, "shape": (n, dim)}
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
        self._lock_fd = lock_fd
        self._offset = len(_npy_header(self.n, self.dim))
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

    def write(self, where: int | Sequence[int] | np.ndarray, rows: Any) -> None:
        """Commit rows: ``write(start, rows)`` for rows start.., or ``write(indices, rows)``.

        ``rows`` is (k, dim), cast to float32. Non-finite rows raise G2ISError naming their
        record ids, and nothing of the batch is stored. Rows already committed are refused.
        """
        self._check_open()
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf: refused below
            rows = np.ascontiguousarray(np.asarray(rows, dtype=np.float32), dtype=DTYPE)
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
        bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
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
        self._write_rows(idx, rows)
        if np.ndim(where) == 0:
            record = _encode(_RANGE, k, int(idx[0]), b"")
        else:
            record = _encode(_LIST, k, 0, idx.astype("<i8").tobytes())
        self._journal.write(record)
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._done[idx] = True

    def _write_rows(self, idx: np.ndarray, rows: np.ndarray) -> None:
        order = np.argsort(idx, kind="stable")
        idx, rows = idx[order], rows[order]
        # pwrite each run of consecutive rows at once, then make the data durable.
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        row_bytes = self.dim * DTYPE.itemsize
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, idx.size]):
            buf = rows[lo:hi].tobytes()
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


def _full_meta(meta: dict[str, Any], n: int, dim: int) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:  # the stored form: what a later run reads back and compares against
        full = json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serialisable (no NaN): {e}") from e
    own = {"n": n, "dim": dim, "dtype": "float32", "store_format": STORE_FORMAT}
    for key, value in own.items():
        if key in full and full[key] != value:
            raise G2ISError(f"meta[{key!r}] = {full[key]!r} contradicts the store's {value!r}")
        full[key] = value
    ids = full.get("record_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != n):
        got = len(ids) if isinstance(ids, list) else type(ids).__name__
        raise G2ISError(f"meta['record_ids'] must list one id per row: n = {n}, got {got}")
    return full


def _create_partial(directory: Path, n: int, dim: int) -> None:
    header = _npy_header(n, dim)
    tmp = directory / (PARTIAL + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.truncate(len(header) + n * dim * DTYPE.itemsize)  # sparse: unwritten rows read as 0
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / PARTIAL)
    _fsync_dir(directory)


def _check_partial(directory: Path, n: int, dim: int) -> None:
    header = _npy_header(n, dim)
    path = directory / PARTIAL
    with open(path, "rb") as f:
        ok = f.read(len(header)) == header
    if not ok or path.stat().st_size != len(header) + n * dim * DTYPE.itemsize:
        raise G2ISError(
            f"{path} does not have the size or header of a {n}x{dim} float32 store (damaged?); "
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
) -> FeatureStore:
    """Create, or resume, the store in ``directory`` for ``n`` rows of ``dim`` features.

    ``meta`` must be JSON-serialisable; on resume it must equal the stored meta.json in every
    key except those in ``ignore`` (e.g. a timestamp), else a G2ISError lists the differences.
    A finished store is refused unless ``overwrite``, which discards everything in the store.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise G2ISError(f"a feature store needs n > 0 rows, got {n!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise G2ISError(f"a feature store needs dim > 0, got {dim!r}")
    full = _full_meta(meta, n, dim)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise G2ISError(f"cannot create the output directory {directory}: {e.strerror}") from e
    lock_fd = _lock(directory)
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
            _create_partial(directory, n, dim)
        _check_partial(directory, n, dim)
        stored = json.loads((directory / META).read_text())
        return FeatureStore(directory, stored, lock_fd)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
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
        _atomic_write(meta_path, json.dumps(full, indent=1).encode())
        return
    try:
        stored = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise G2ISError(f"cannot read {meta_path}: {e}; use --overwrite to start again") from e
    diffs = _diff(
        {k: v for k, v in stored.items() if k not in ignore},
        {k: v for k, v in full.items() if k not in ignore},
        "",
    )
    if diffs:
        raise G2ISError(
            f"{directory} holds features for a different input or configuration:\n  "
            + "\n  ".join(diffs)
            + "\nRefusing to mix them. Write to a new --out directory, or pass --overwrite to "
            "discard the stored features and start again."
        )
    if (directory / FEATURES).exists():
        for stale in (PARTIAL, JOURNAL):  # left by a kill between finishing and cleaning up
            with contextlib.suppress(FileNotFoundError):
                (directory / stale).unlink()
        raise G2ISError(
            f"{directory} already holds finished features ({full['n']}x{full['dim']}) for this "
            "configuration; load them (load_features), or pass --overwrite to recompute"
        )


# ----------------------------------------------------------------------------- reading


def load_features(
    directory: str | os.PathLike[str], *, mmap: bool = False
) -> tuple[np.ndarray, dict[str, Any]]:
    """``(features (N, d) float32, meta)`` of a finished store; ``mmap`` maps it read-only."""
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.exists():
        raise G2ISError(
            f"no feature store at {directory} (no {META}); compute it with `g2is grads --out`"
        )
    try:
        meta = json.loads(meta_path.read_text())
        n, dim = int(meta["n"]), int(meta["dim"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise G2ISError(f"{meta_path} is not a feature-store meta.json: {e}") from e
    path = directory / FEATURES
    if not path.exists():
        done, _ = _read_journal(directory / JOURNAL, n)
        hint = (
            "all rows are written; re-run the same command to finish"
            if done.all()
            else "re-run the same command to resume"
        )
        raise G2ISError(f"incomplete feature store {directory}: {int(done.sum())}/{n} rows; {hint}")
    try:
        features = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise G2ISError(f"cannot read {path}: {e}; recompute it with --overwrite") from e
    if features.shape != (n, dim) or features.dtype != DTYPE:
        raise G2ISError(
            f"{path} is {features.shape} {features.dtype} but {META} says ({n}, {dim}) float32; "
            "the store is damaged: recompute it with --overwrite"
        )
    return features, meta


# ----------------------------------------------------------------------------- shards


SHARD_ROWS = "rows.npy"  # in a shard store: the merged store's row of each of its rows
SHARD_KEY = "shard"  # a shard store's meta key describing its place in the run


def save_shard_rows(directory: str | os.PathLike[str], rows: np.ndarray) -> None:
    """Record, next to a shard store, which rows of the merged store its rows are."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(rows, dtype="<i8"), allow_pickle=False)
    _atomic_write(Path(directory) / SHARD_ROWS, buf.getvalue())


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
                            f"{parts[0][0]}:\n  " + "\n  ".join(diffs))
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
    with open_store(out, meta, n, int(parts[0][1].shape[1]), overwrite=True) as store:
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
