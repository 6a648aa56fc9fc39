"""The process group of a data_prep run: one process, or N ranks under mpirun / srun (mpi4py).

Ranks split work by fixed blocks, write one part file per block, and rank 0 merges; so the result does not depend on
the number of ranks. Waiting ranks sleep instead of spinning (Open MPI's barrier busy-polls a core).
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from retro_dist.launch_env import launched_by_mpi

T = TypeVar("T")


class PrepError(RuntimeError):
    """A stage could not finish (on this rank or another): `retro-dist prepare` prints it as one line."""


class World:
    """rank, size, barrier(), bcast(), allreduce_max(); a single process when not launched by MPI."""

    def __init__(self) -> None:
        self.comm = None
        self.rank, self.size = 0, 1
        if launched_by_mpi():
            try:
                from mpi4py import MPI
            except ImportError as e:
                raise PrepError(f"launched under MPI but mpi4py cannot load its MPI library ({e}); install "
                                   f"Open MPI (apt-get install openmpi-bin) or run without mpirun") from None
            self.comm = MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self, poll: float = 0.05) -> None:
        if self.comm is None:
            return
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(poll)

    def bcast(self, value: T) -> T:
        if self.comm is None:
            return value
        self.barrier()
        return self.comm.bcast(value, root=0)

    def gather_errors(self, error: BaseException | None) -> str | None:
        """Every rank learns the first error any rank hit, so all of them stop together instead of hanging."""
        message = None if error is None else f"rank {self.rank}: {error}"
        if self.comm is None:
            return message
        self.barrier()
        messages: list[Any] = self.comm.allgather(message)
        return next((m for m in messages if m), None)

    def gather(self, value: T) -> list[T] | None:
        """Every rank's value, in rank order, on rank 0 (None on the others)."""
        if self.comm is None:
            return [value]
        self.barrier()  # sleep until every rank arrives, rather than spin inside gather
        return self.comm.gather(value, root=0)

    def allgather(self, value: T) -> list[T]:
        """Every rank's value, in rank order, on every rank."""
        if self.comm is None:
            return [value]
        self.barrier()  # sleep until every rank arrives, rather than spin inside allgather
        return self.comm.allgather(value)

    def check(self, error: BaseException | None) -> None:
        """A collective step: when any rank hit an error, every rank raises (its own error, or the first one's
        message), so that no rank waits at a later collective for one that has left."""
        first = self.gather_errors(error)
        if error is not None:
            raise error
        if first is not None:
            raise PrepError(first)

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0, its result broadcast to every rank; an error there is raised on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised by check
                error = e
        self.check(error)
        return self.bcast(result)

    def my_blocks(self, num_blocks: int) -> range:
        """Blocks this rank computes: round-robin, so a partial rerun spreads the remaining blocks evenly."""
        return range(self.rank, num_blocks, self.size)
