"""Where a logging window's time went: waiting for data, forward + backward, optimizer step.

On a GPU the host runs ahead of the device, so host clocks around a kernel launch measure where the next
synchronisation happens to fall. The device phases are timed with CUDA events instead, read once per logging window
(the one synchronisation); the data phase is the host's wait for the loader and is timed on the host everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepTimes:
    """Seconds per optimizer step, averaged over a logging window."""

    step: float
    data: float
    fwd_bwd: float
    optimizer: float
    steps: int
    wall: float


class StepTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.data = 0.0
        self.spans: dict[str, list] = {"fwd_bwd": [], "optimizer": []}

    def now(self):
        """A time point: a recorded CUDA event on a GPU, the host clock elsewhere."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add_data(self, seconds: float) -> None:
        self.data += seconds

    def add(self, phase: str, start, end) -> None:
        self.spans[phase].append((start, end))

    def read(self) -> StepTimes:
        """The window's averages; synchronises the device once."""
        if self.cuda:
            torch.cuda.synchronize()
        totals = {phase: sum(s.elapsed_time(e) / 1e3 if self.cuda else e - s for s, e in spans)
                  for phase, spans in self.spans.items()}
        n, wall = max(1, self.steps), time.perf_counter() - self.started
        return StepTimes(step=wall / n, data=self.data / n, fwd_bwd=totals["fwd_bwd"] / n,
                         optimizer=totals["optimizer"] / n, steps=self.steps, wall=wall)
