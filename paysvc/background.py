"""Periodic background work inside ``paysvc serve``. Each job must be safe on several instances."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0


def stop_if_cancelled() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop but an await swallowed the request.

    On Python 3.11, ``asyncio.wait_for`` returns the awaited result when the cancellation arrives just as that
    result does, and the cancellation is lost (fixed in 3.12). Our code uses ``asyncio.timeout`` instead, but
    aio-pika and aiormq call ``wait_for`` inside (connecting, and their RPCs), so a loop that runs until
    cancelled could carry on after its cancellation, and the service's shutdown, which cancels its background
    tasks and waits for them, would never end (seen with the event relay in tests). The request stays counted
    (``Task.cancelling()``) however it was swallowed, so every background loop checks at each turn and before
    each pause (``pause``), and stops there.

    Keep ``asyncio.TaskGroup`` out of background steps: on 3.11 one whose child fails after its body has
    finished leaves the count raised without a cancellation, and the loop would stop at its next check.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause(seconds: float) -> None:
    """``asyncio.sleep`` for background loops, after ``stop_if_cancelled``: a step that swallowed its
    cancellation stops the loop at once, not after the pause (an hour, for some jobs)."""
    stop_if_cancelled()
    await asyncio.sleep(seconds)


def backoff(interval: float, failures: int, cap: float) -> float:
    """``interval`` doubled per failure, at most ``cap``. The exponent is bounded: a float times 2 ** 1024 raises
    OverflowError, which ended a loop that kept failing for days (found by review: a poller after 1,024 refused
    tokens, about 85 hours)."""
    return min(interval * 2 ** min(failures, 32), cap)


class Failures:
    """How a background loop treats its failures: it waits twice as long after each failure, up to
    ``MAX_BACKOFF_SECONDS`` (at least ``interval``), and logs the traceback once, then one line per failure
    while it keeps failing the same way (the database down, a ledger that was tampered with)."""

    def __init__(self, name: str, interval: float) -> None:
        self.name, self.interval = name, interval
        self.count, self._last = 0, None

    def failed(self, exc: BaseException) -> float:
        """Log ``exc``; return how long to wait before the next run."""
        self.count += 1
        delay = backoff(self.interval, self.count, max(self.interval, MAX_BACKOFF_SECONDS))
        same = repr(exc) == self._last
        self._last = repr(exc)
        if same:
            log.error("%s still failing (%d runs): %s; retrying in %.0fs", self.name, self.count, exc, delay,
                      extra={"job": self.name})
        else:
            log.error("%s failed; retrying in %.0fs", self.name, delay, exc_info=exc, extra={"job": self.name})
        return delay

    def succeeded(self) -> None:
        if self.count:
            log.info("%s recovered after %d failed runs", self.name, self.count, extra={"job": self.name})
        self.count, self._last = 0, None


async def run_periodically(name: str, interval: float, job: Callable[[], Awaitable[object]]) -> None:
    """Run ``job`` every ``interval`` seconds until cancelled; a failing run is logged, not fatal (``Failures``)."""
    failures = Failures(name, interval)
    while True:
        stop_if_cancelled()
        delay = interval
        try:
            result = await job()
            failures.succeeded()
            if result:
                log.info("%s: %s", name, result, extra={"job": name})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = failures.failed(exc)
        await pause(delay)
