"""Preemption: SIGUSR1 / SIGTERM set a flag in the main process; workers and helper processes never see them.

SLURM delivers `--signal=USR1@<grace>`, `scancel --signal=...`, the time limit's SIGTERM and a preemption's
SIGTERM to *every* process of the job step: the ranks, their DataLoader workers, a compiler that DeepSpeed's
first op build started, wandb's service process. Those children must not die (a dead worker or `ninja` takes
the rank down with a traceback), and the rank must not die either, whatever it is doing at that moment.

`install()` (called first thing by `python -m pretrain|finetune`) therefore
- blocks the signals in the calling (main) thread: every thread and every child process started afterwards
  inherits the blocked mask (across fork *and* exec), so workers, compilers and helpers keep running;
- starts one daemon thread that takes the signals with `sigtimedwait` and sets the flag;
- installs Python handlers that set the same flag, for threads that existed before and have them unblocked.
The training loop reads the flag once per optimizer step through an all-reduce (`distributed.any_rank`), so
every rank stops after the same step, saves the same checkpoint and exits with the requeue code together.

`PreemptionFlag()` is the scoped form for code that runs inside another program (tests, notebooks): it
installs on entry and restores the mask and handlers on exit, unless `install()` already holds the process.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """`with PreemptionFlag() as flag:` ... `flag.requested` turns true on the first signal (process-wide)."""

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self._scoped: _Installation | None = None

    @property
    def requested(self) -> bool:
        return _received is not None

    @property
    def received(self) -> int | None:
        return _received

    def name(self) -> str:
        if _received is None:
            return ""
        try:
            return signal.Signals(_received).name
        except ValueError:
            return f"signal {_received}"

    def __enter__(self) -> "PreemptionFlag":
        global _active
        if _active is None:
            self._scoped = _active = _Installation(self.signals)
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if self._scoped is not None:
            self._scoped.remove()
            self._scoped = _active = None


_received: int | None = None
_active: "_Installation | None" = None        # the installation in force (install()'s or a scope's)


def _set(signum: int) -> None:
    global _received
    if _received is None:
        _received = signum


class _Installation:
    def __init__(self, signals: tuple[int, ...]):
        global _received
        _received = None
        self.signals = signals
        self._stop = threading.Event()
        self._handlers = {s: signal.signal(s, self._handle) for s in signals}
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        self._thread = threading.Thread(target=self._wait, name="preemption-signals", daemon=True)
        self._thread.start()

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        _set(signum)

    def _wait(self) -> None:
        while not self._stop.is_set():
            info = signal.sigtimedwait(self.signals, 0.2)
            # only a signal we wait for counts: a requeued SLURM step once produced a garbage si_signo here at
            # start-up, which stopped a healthy run as if preempted
            if info is not None and info.si_signo in self.signals:
                _set(info.si_signo)

    def remove(self) -> None:
        self._stop.set()
        self._thread.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        for s, prev in self._handlers.items():
            signal.signal(s, prev)


def install(signals: tuple[int, ...] = DEFAULT_SIGNALS) -> PreemptionFlag:
    """Hold the signals for the rest of the process (program entry points only; see the module docstring)."""
    global _active
    if _active is None:
        _active = _Installation(tuple(signals))
    return PreemptionFlag(tuple(signals))
