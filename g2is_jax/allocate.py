"""The project's one largest-remainder allocator (NumPy only, importable from any module).

Used by selection (budgets per core-knowledge component, `select.core.allocate_budgets`) and by
the synthetic suite (records per domain, `data.tasks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from g2is_jax.errors import G2ISError


def largest_remainder(total: int, weights: Sequence[float] | np.ndarray, *,
                      ties: Literal["later", "earlier"] = "later",
                      normalize: bool = False) -> np.ndarray:
    """Split `total` by `weights` into integers that sum to `total`.

    Each part is floor(total * w) (``total * w / sum(w)`` with `normalize`: the division is
    done last, so shares are exact for equal weights); the leftover units go one each to the
    largest fractional remainders. Equal remainders go to the later part first
    (``ties="later"``, what the G2IS authors' ``np.argsort(...)[::-1]`` does) or to the earlier
    part first (``"earlier"``).
    """
    if ties not in ("later", "earlier"):
        raise G2ISError(f"ties must be 'later' or 'earlier', got {ties!r}", param="ties")
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum() if normalize else total * w
    parts = np.floor(exact).astype(np.int64)
    leftover = int(total - parts.sum())
    if leftover > 0:
        frac = exact - parts
        order = (np.argsort(frac, kind="stable")[::-1] if ties == "later"
                 else np.argsort(-frac, kind="stable"))
        parts[order[:leftover]] += 1
    return parts


__all__ = ["largest_remainder"]
