"""Stop requests by signal, for long runs (training, generation).

SLURM sends SIGTERM (or the ``--signal`` of the job script, SIGUSR1 in ours) before it kills a job;
a run that catches it finishes the current step, saves, and exits cleanly. The handlers live only
for the length of the run: afterwards the previous ones are back, so a process that trains and then
forks workers (a phantom pool, say) does not leave them deaf to ``terminate()``.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

#: the exit code of a run that a signal stopped before its work was done (``EX_TEMPFAIL`` of
#: ``sysexits.h``: "try again later"): ``medgen-train`` and ``medgen-generate`` exit with it, the SLURM
#: templates requeue a job on it, and ``cmd && next`` does not go on to ``next``
STOPPED_EXIT = 75


@dataclass
class StopRequest:
    """Set by a caught signal; the run polls ``requested`` between steps."""
    requested: bool = False


@contextmanager
def stop_signals(ctrl_c: bool = False, request: StopRequest | None = None) -> Iterator[StopRequest]:
    """Catch SIGTERM and SIGUSR1 (and, with ``ctrl_c``, a first Ctrl-C; a second one interrupts at
    once) as a stop request while the block runs; restore the previous handlers on exit. Outside
    the main thread signals cannot be caught, and the request simply never comes.

    ``request``: an outer block's request to go on setting, so that a signal caught while a run was
    still starting (an outer block without Ctrl-C, say) stops the run at its first step boundary."""
    stop = request if request is not None else StopRequest()

    def handler(signum, frame):  # noqa: ARG001
        if signum == signal.SIGINT and stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    caught = [signal.SIGTERM, signal.SIGUSR1] + ([signal.SIGINT] if ctrl_c else [])
    previous = {}
    try:
        for sig in caught:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread
        pass
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def ignore_late_warning() -> None:
    """Ignore SIGUSR1 from now on (a finished run's process, until it exits); nothing outside the main
    thread can set it, and there it is left as it is."""
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    except ValueError:  # not in the main thread
        pass


def default_signals() -> None:
    """Pool initializer: a forked worker gets the default handlers back, so ``Pool.terminate()``
    ends it even when its parent catches SIGTERM at the time of the fork."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
