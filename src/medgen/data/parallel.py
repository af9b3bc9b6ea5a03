"""Per-patient work (checking, preprocessing) spread over worker processes, results in order.

It reuses PyTorch's ``DataLoader`` workers as the process pool: they start with one intra-op
thread each, are fork-safe with torch already imported, and hand results back in order. Every
worker dies with the process that started it (:func:`worker_init_dying_with_parent`), so a killed
run leaves no worker behind, and a process that ends with persistent workers still running (a
script that keeps a trainer to the end) stops them first (:func:`stopping_at_exit`).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import weakref
from functools import partial
from typing import Callable, Iterator, Sequence, TypeVar

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medgen.core.fs import die_with_parent

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


def _die_with_parent(parent_pid: int | None, worker_id: int) -> None:
    die_with_parent(os.getppid() if parent_pid is None else parent_pid)


#: the loaders whose persistent workers are shut down at this process's exit
_persistent: "weakref.WeakSet[DataLoader]" = weakref.WeakSet()


def _shut_down_persistent_workers() -> None:
    """At interpreter exit, before ``multiprocessing``'s own exit hook (atexit runs hooks last in,
    first out): the persistent workers of the loaders still alive are told to stop and joined,
    as PyTorch does when their iterator is deleted."""
    for loader in list(_persistent):
        shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def stopping_at_exit(loader: DataLoader) -> DataLoader:
    """``loader``, whose persistent workers (if any) this process stops when it exits. They ignore
    SIGTERM (:func:`~medgen.core.fs.die_with_parent`), which is how ``multiprocessing`` would end
    them before waiting for them: a script that keeps a trainer to its last line would never exit."""
    if not _persistent_hook:
        atexit.register(_shut_down_persistent_workers)
        _persistent_hook.append(True)
    _persistent.add(loader)
    return loader


_persistent_hook: list[bool] = []


def worker_init_dying_with_parent() -> Callable[[int], None]:
    """A ``worker_init_fn`` for a ``DataLoader`` created in this process: each worker gets SIGKILL
    when this process dies, and exits at once if it is already gone. Without it, a worker blocked
    on a full result pipe outlives a killed run for good. The workers ignore Ctrl-C, SIGTERM and
    SIGUSR1 (:func:`~medgen.core.fs.die_with_parent`): a loader with persistent workers is passed
    through :func:`stopping_at_exit`. Picklable (a module function bound with ``partial``). Under
    the forkserver start method a worker's parent is the fork server, which exits with this process:
    the worker follows that one."""
    direct = multiprocessing.get_start_method() != "forkserver"
    return partial(_die_with_parent, os.getpid() if direct else None)


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int = 0, desc: str | None = None,
                progress: bool = True, unit: str = "patient") -> Iterator[R]:
    """``map(fn, items)`` in ``workers`` processes (0 or 1: in this process), in order, with a progress bar."""
    items = list(items)
    n = min(int(workers), len(items)) if workers > 1 else 0
    if n:
        results = iter(DataLoader(_Jobs(fn, items), batch_size=None, num_workers=n, collate_fn=_as_is,
                                  worker_init_fn=worker_init_dying_with_parent()))
    else:
        results = (fn(item) for item in items)
    yield from tqdm(results, total=len(items), desc=desc, unit=unit, disable=None if progress else True)
