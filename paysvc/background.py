"""Periodic background work inside ``paysvc serve``. Each job must be safe on several instances."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


async def run_periodically(name: str, interval: float, job: Callable[[], Awaitable[object]]) -> None:
    """Run ``job`` every ``interval`` seconds until cancelled; a failing run is logged, not fatal."""
    while True:
        try:
            result = await job()
            if result:
                log.info("%s: %s", name, result, extra={"job": name})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; retrying in %ss", name, interval, extra={"job": name})
        await asyncio.sleep(interval)
