"""Preemption: SIGUSR1 / SIGTERM set a flag; the loop finishes its step, saves, and exits with the requeue code.

SLURM sends `--signal=USR1@<grace>` seconds before the time limit (and SIGTERM on preemption). A handler that
only sets a flag is safe at any point of a step; the loop checks the flag once per optimizer step with an
all-reduce (`distributed.any_rank`) so every rank stops after the same step and the collective save matches.
"""
from __future__ import annotations

import signal
from types import FrameType

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Install with `with PreemptionFlag() as flag:`; `flag.requested` turns true on the first signal."""

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "PreemptionFlag":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""
