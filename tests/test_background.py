"""Background jobs: a job that keeps failing backs off and does not repeat its traceback every second."""

from __future__ import annotations

import asyncio
import logging
import types

import pytest

from paysvc import background


def _failing_four_times(monkeypatch, caplog, exc: Exception):
    """A step that raises ``exc`` four times and then works; pauses recorded (not slept), the sixth stopping the
    loop; back-off capped at 5 s. Returns (the pauses, the step)."""
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 6:
            raise asyncio.CancelledError

    outcomes = iter([exc] * 4 + [None, None])

    async def step(*_args):
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        return None

    monkeypatch.setattr(background.asyncio, "sleep", sleep)
    monkeypatch.setattr(background, "MAX_BACKOFF_SECONDS", 5.0)
    caplog.set_level(logging.INFO, logger="paysvc.background")
    return delays, step


def _assert_backed_off_and_logged_once(delays: list[float], caplog, still: str, recovered: str) -> None:
    assert delays == [2.0, 4.0, 5.0, 5.0, 1.0, 1.0]  # doubling, capped; back to the interval once it works
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 4
    assert failures[0].exc_info is not None and all(r.exc_info is None for r in failures[1:])
    assert still in failures[-1].getMessage()
    assert any(recovered in r.getMessage() for r in caplog.records)


async def test_a_job_failing_the_same_way_backs_off_and_logs_its_traceback_once(monkeypatch, caplog):
    delays, job = _failing_four_times(monkeypatch, caplog, RuntimeError("ledger tampered"))
    with pytest.raises(asyncio.CancelledError):
        await background.run_periodically("ledger-seal", 1.0, job)
    _assert_backed_off_and_logged_once(delays, caplog, "still failing (4 runs): ledger tampered",
                                       "recovered after 4 failed runs")


async def test_webhook_delivery_backs_off_while_its_steps_fail_and_logs_the_traceback_once(monkeypatch, caplog):
    """Found by an operator's walk-through: while the database was down, the webhook worker logged a full traceback
    every second, with no back-off."""
    from paysvc.webhooks import WebhookWorker

    delays, fan_out = _failing_four_times(monkeypatch, caplog, OSError("database down"))

    async def claim(now, limit):
        return []

    worker = WebhookWorker(None, None, None)  # type: ignore[arg-type]  # its steps are replaced below
    monkeypatch.setattr(worker, "fan_out", fan_out)
    monkeypatch.setattr(worker, "claim", claim)
    with pytest.raises(asyncio.CancelledError):
        await worker.run(1.0)
    _assert_backed_off_and_logged_once(delays, caplog, "webhooks still failing (4 runs): database down",
                                       "webhooks recovered after 4 failed runs")


HOUR = 3600.0


def _loop_under_test(kind: str, step):
    """The ``run()`` coroutine of one background loop, with the step it repeats replaced by ``step``, and an
    hour's pause between steps (as the hourly jobs have)."""
    from paysvc.poller import PollPolicy, Poller
    from paysvc.relay import Relay
    from paysvc.webhooks import WebhookWorker
    from tests.test_events_support import signer

    if kind == "periodic job":
        return background.run_periodically("job", HOUR, step)
    if kind.startswith("relay"):
        relay = Relay(None, "amqp://unused/", signer(), poll_interval=HOUR, idle_max=HOUR,  # type: ignore[arg-type]
                      backoff_initial=HOUR, backoff_max=HOUR, retention=None)

        async def connected() -> None:
            return None

        async def failing() -> int:
            await step()
            raise RuntimeError("the broker connection was lost")  # into the relay's backoff
        relay.connect = connected  # type: ignore[method-assign]
        relay.publish_pass = failing if kind == "relay, failing" else step  # type: ignore[method-assign]
        return relay.run()
    if kind == "bakong poller":
        stub = types.SimpleNamespace(name="stub")  # run() names its provider in /metrics
        poller = Poller(None, stub, PollPolicy(), interval=HOUR)  # type: ignore[arg-type]

        async def drained():
            await step()
            return 0, 0
        poller.poll_until_drained = drained  # type: ignore[method-assign]
        return poller.run()
    worker = WebhookWorker(None, None, None)  # type: ignore[arg-type]

    async def nothing_due(now, limit):
        return []
    worker.fan_out, worker.claim = step, nothing_due  # type: ignore[method-assign]
    return worker.run(HOUR)


@pytest.mark.parametrize("kind", ["periodic job", "relay", "relay, failing", "bakong poller", "webhooks"])
async def test_a_background_loop_stops_even_when_a_step_swallowed_its_cancellation(kind):
    """On Python 3.11, ``asyncio.wait_for`` (inside aio-pika and aiormq) returns the awaited result when
    the cancellation arrives with it, so the step returns as if nothing happened. The step below does exactly
    that. The loop must stop all the same, and at once, not after its pause: the service's shutdown cancels
    it and waits for it (a relay that went on after its cancellation hung a test run until its timeout)."""
    started = asyncio.Event()
    swallow = True

    async def step(*_args):
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if not swallow:
                raise
        return 0

    task = asyncio.create_task(_loop_under_test(kind, step))
    try:
        async with asyncio.timeout(5):
            await started.wait()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, f"the {kind} loop carried on after it was cancelled"
        assert task.cancelled()
    finally:
        swallow = False
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
