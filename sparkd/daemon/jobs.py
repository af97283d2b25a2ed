"""systemd job tracking: sparkd waits for the jobs it starts (StartUnit, StopUnit) to end,
which it learns from JobRemoved signals on the loop."""

from __future__ import annotations

import asyncio
from typing import Final

JOB_RESULTS_KEPT: Final = 256


class JobTracker:
    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[str]] = {}
        self._results: dict[int, str] = {}

    async def wait(self, job: str, timeout_s: float) -> str:
        """The job's result (`done`, `failed`, ...), or a sentence when systemd did not
        answer within `timeout_s`. `job` is the job's object path."""
        job_id = int(job.rstrip("/").rsplit("/", 1)[-1])
        if job_id in self._results:
            return self._results.pop(job_id)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return "no answer from systemd in time"
        finally:
            self._waiters.pop(job_id, None)

    def finished(self, job_id: int, result: str) -> None:
        waiter = self._waiters.pop(job_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)
            return
        # The signal can arrive before the StartUnit call has returned its job path.
        self._results[job_id] = result
        while len(self._results) > JOB_RESULTS_KEPT:
            del self._results[next(iter(self._results))]
