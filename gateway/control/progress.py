"""What every worker enforces: each worker's applied command offset, in memory the
supervisor shares with them, so `?wait=1` and /readyz speak for the whole gateway."""

from __future__ import annotations

import multiprocessing
from typing import Any


class WorkerProgress:
    """Each worker's applied command offset in shared memory, so the supervisor knows what every worker enforces.

    Create it in the supervisor before the workers start and hand it to them; each worker runs
    `report(i, follower)`. A slot reads NOT_READY until that worker's view is bootstrapped,
    then the highest command offset it applied (-1: none yet).
    """

    NOT_READY = -2

    def __init__(self, workers: int) -> None:
        self.slots = multiprocessing.RawArray("q", [self.NOT_READY] * workers)
        self.adoptions = multiprocessing.RawValue("q", 0)  # operator requests to adopt the log now there

    async def report(self, slot: int, follower: Any) -> None:
        """In worker `slot`: publish its progress whenever its follower applies a command (until cancelled)."""
        adopted = self.adoptions.value
        await follower.ready.wait()
        while True:
            applied = follower.applied_command if follower.applied_command is not None else -1
            self.slots[slot] = applied
            if self.adoptions.value != adopted:  # POST /admin/adopt reaches every worker's follower
                adopted = self.adoptions.value
                follower.adopt()
            await follower.wait_applied(applied + 1, timeout=1.0)

    def adopt(self) -> None:
        """In the supervisor: tell every worker's follower to adopt the log the view topic holds now."""
        self.adoptions.value += 1

    def reset(self, slot: int) -> None:
        """The worker in `slot` exited: not ready until its replacement reports."""
        self.slots[slot] = self.NOT_READY

    def applied(self) -> int:
        """The command offset every worker has applied (NOT_READY while any worker bootstraps)."""
        return min(self.slots, default=-1)

    def ready(self) -> bool:
        return self.applied() > self.NOT_READY
