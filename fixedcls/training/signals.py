"""Stop signals: SIGTERM, SIGINT and the schedulers' preemption signals become a flag the loop checks at
step boundaries, so a run always stops with its state saved."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Optional

# SIGUSR2: submitit's (>= 1.5) default preemption/timeout signal; SIGUSR1: older submitit and plain sbatch --signal.
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None), getattr(signal, "SIGUSR1", None),
                                 getattr(signal, "SIGUSR2", None)) if s)


class TrainingInterrupted(Exception):
    """Raised after a stop signal was honoured: the state was saved at a step boundary."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        where = f"state saved to {checkpoint}" if checkpoint is not None else "no checkpoint written by this process"
        super().__init__(f"stopped by {name}; {where}; continue with resume=auto")


class StopSignals:
    """Turns SIGTERM/SIGINT/SIGUSR1/SIGUSR2 into a flag the loop checks at each step boundary.

    The previous handlers are kept so a launcher's own handler (submitit's requeue on SIGUSR1)
    can still run once our checkpoint is safely written.
    """

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
