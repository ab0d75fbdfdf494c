"""Background jobs: a job that keeps failing backs off and does not repeat its traceback every second."""

from __future__ import annotations

import asyncio
import logging

import pytest

from paysvc import background


async def test_a_job_failing_the_same_way_backs_off_and_logs_its_traceback_once(monkeypatch, caplog):
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 6:
            raise asyncio.CancelledError

    outcomes = iter([RuntimeError("ledger tampered")] * 4 + [None, None])

    async def job():
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        return None

    monkeypatch.setattr(background.asyncio, "sleep", sleep)
    monkeypatch.setattr(background, "MAX_BACKOFF_SECONDS", 5.0)
    caplog.set_level(logging.INFO, logger="paysvc.background")
    with pytest.raises(asyncio.CancelledError):
        await background.run_periodically("ledger-seal", 1.0, job)
    assert delays == [2.0, 4.0, 5.0, 5.0, 1.0, 1.0]  # doubling, capped; back to the interval once it works
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 4
    assert failures[0].exc_info is not None and all(r.exc_info is None for r in failures[1:])
    assert "still failing (4 runs): ledger tampered" in failures[-1].getMessage()
    assert any("recovered after 4 failed runs" in r.getMessage() for r in caplog.records)
