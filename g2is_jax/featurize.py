"""Records → gradient features on disk: the driver behind `g2is grads`.

The plan is fixed by the input alone: records are encoded, grouped into static-shape batches by
length bucket (`make_batches(order="bucketed")`, no shuffling), and every batch runs through one
jitted program per bucket (per-example grads → feature transform → projection, see
`g2is_jax.gradients.feature_fn`). Each finished batch is committed to the resumable feature store;
on a restart the batches already committed are skipped, so a killed run finishes with the same
bytes as an uninterrupted one. Everything that decides the bytes (model, adapter or checkpoint,
data hash, gradient type, projection, batch size, max length, dtype) goes into meta.json, and the
store refuses to resume under a different one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from g2is_jax import __version__
from g2is_jax.data import Record, encode_records, length_buckets, make_batches
from g2is_jax.errors import G2ISError
from g2is_jax.gradients import AdamMoments, feature_fn
from g2is_jax.models.llama import Llama
from g2is_jax.models.lora import completion_loss, count_params, merge_lora, split_lora
from g2is_jax.progress import progress_bar
from g2is_jax.projection import Projector, flatten_per_example
from g2is_jax.store import open_store

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
                     gradient: str, projector: Projector, moments: AdamMoments | None = None,
                     batch_size: int = 8, max_length: int = 2048,
                     meta: dict[str, Any] | None = None, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Write the features of `records` (row i = record i) to the store `out`.

    `gradient` is "sgd", "adam" or "sign" (gradients with respect to the LoRA adapters `model`
    carries, projected by `projector`), or "representation": the final hidden state at each
    record's last token, as LESS's RDS baseline uses (unprojected, width = hidden size).
    Returns the path of the finished `features.npy`.
    """
    if not records:
        raise G2ISError("no records to compute features for")
    if batch_size < 1:
        raise G2ISError(f"--batch-size must be ≥ 1, got {batch_size}")
    graphdef, base, lora = split_lora(model)
    n_params = count_params(lora)
    if gradient == "representation":
        projector = Projector(kind="none")
        dim = model.config.hidden_size
        f = representation_fn(graphdef)
    else:
        if model.lora_config is None:
            raise G2ISError("the model has no LoRA adapters: pass a warmup --checkpoint or a "
                            "PEFT --adapter")
        dim = projector.out_dim(n_params)
        # Flatten, then project once: projecting leaf by leaf (`Projector.apply_tree`) compiles
        # one loop per LoRA leaf (240 for SmolLM2 on q,k,v,o), measured 77 s of XLA compile
        # against 10 s for one loop over the concatenation; the [B, P] rows exist as gradients.
        f = feature_fn(completion_loss(graphdef), gradient,
                       lambda tree: projector(flatten_per_example(tree)))
    encoded, report = encode_records(records, tokenizer, max_length=max_length, progress=False)
    if report.n_truncated:
        log.warning("%d of %d records truncated to %d tokens", report.n_truncated, len(records),
                    max_length)
    full_meta = {
        **(meta or {}),
        "gradient": gradient,
        "projection": projector.describe(),
        "lora_params": n_params,
        "model_dtype": model.dtype_name,
        "batch_size": batch_size,
        "max_length": max_length,
        "n_truncated": report.n_truncated,
        "record_ids": [r.id for r in records],
        "package_version": __version__,
        "jax_version": jax.__version__,
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    batches = make_batches(encoded, batch_size=batch_size, buckets=length_buckets(max_length),
                           pad_id=pad, order="bucketed")
    with open_store(out, full_meta, len(records), dim, overwrite=overwrite,
                    ignore=("package_version", "jax_version")) as store:
        todo = [b for b in batches if not store.written(b.indices[b.indices >= 0]).all()]
        if len(todo) < len(batches):
            log.info("resuming: %d of %d batches already stored", len(batches) - len(todo),
                     len(batches))
        t0, done = time.perf_counter(), 0
        bar = progress_bar(todo, desc=f"{gradient} features", unit="batch", enabled=progress)
        for b in bar:
            feats, finite = f(lora, base, b.arrays(), moments)
            real = b.indices >= 0
            finite = np.asarray(finite)[real]
            if not finite.all():
                bad = store.record_ids(b.indices[real][~finite])
                raise G2ISError(
                    f"non-finite gradients for records {bad}; they were not stored. Check those "
                    "records (and the checkpoint); the rows computed so far are kept")
            store.write(b.indices[real], np.asarray(feats)[real])
            done += int(real.sum())
            bar.set_postfix(rec_s=f"{done / (time.perf_counter() - t0):.1f}")
        return store.finalize()
