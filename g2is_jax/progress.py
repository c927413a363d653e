"""Progress bars for long work: shown on a terminal, silent in logs, CI and pipes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A tqdm bar over `items`; `enabled=False` silences it, and so does a non-terminal stderr
    (tqdm's `disable=None`), so logs never fill with carriage-return updates."""
    return tqdm(items, desc=desc, unit=unit, disable=None if enabled else True)
