"""Per-patient work (checking, preprocessing) spread over worker processes, results in order.

It reuses PyTorch's ``DataLoader`` workers as the process pool: they start with one intra-op
thread each, are fork-safe with torch already imported, and hand results back in order.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence, TypeVar

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


class _Jobs(Dataset):
    def __init__(self, fn: Callable[[T], R], items: Sequence[T]):
        self.fn, self.items = fn, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> R:
        return self.fn(self.items[index])


def _as_is(x):
    return x


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int = 0, desc: str | None = None,
                progress: bool = True, unit: str = "patient") -> Iterator[R]:
    """``map(fn, items)`` in ``workers`` processes (0 or 1: in this process), in order, with a progress bar."""
    items = list(items)
    n = min(int(workers), len(items)) if workers > 1 else 0
    if n:
        results = iter(DataLoader(_Jobs(fn, items), batch_size=None, num_workers=n, collate_fn=_as_is))
    else:
        results = (fn(item) for item in items)
    yield from tqdm(results, total=len(items), desc=desc, unit=unit, disable=None if progress else True)
