"""The open-loop generator the benchmarks share: requests leave on schedule, latency counts from the schedule,
the warm-up is kept apart, and a missed p99 can be placed in time."""

import asyncio
import time

from aiohttp import web
from aiohttp.test_utils import TestServer

from load import openloop


async def test_latency_runs_from_the_schedule_and_the_warmup_is_kept_apart():
    stalled = asyncio.Event()

    async def handler(request):
        n = int((await request.read()) or 0)
        if n == 25 and not stalled.is_set():  # one request, in the measured part, is slow to answer
            stalled.set()
            await asyncio.sleep(0.3)
        if n == 32:  # and the generator itself falls behind: the next sends leave late
            time.sleep(0.4)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", handler)
    srv = TestServer(app)
    await srv.start_server()
    url = str(srv.make_url("/"))

    async def request(session, i):
        async with session.post(url, data=str(i).encode()) as r:
            await r.read()
            return r.status

    try:
        r = await openloop.run(request, rate=20, duration=1.5, warmup=0.5)
    finally:
        await srv.close()
    assert r.sent == r.ok == 30 and not r.errors
    assert len(r.warmup_latencies_ms) == 10 and r.ok_with_warmup == 40
    assert all(0 <= t < 1.5 for t in r.sent_at)
    assert max(r.latencies_ms) >= 300  # the stalled request
    # Requests due while the loop was blocked were sent up to 0.4 s late: their latency counts from when they
    # were due, not from when they left (the server answers them at once).
    late = [ms for t, ms in zip(r.sent_at, r.latencies_ms) if 1.1 <= t < 1.2]
    assert late and min(late) >= 150, late
    assert r.late_starts >= 1
    stalled_ms = max(ms for t, ms in zip(r.sent_at, r.latencies_ms) if t < 1)
    assert stalled_ms >= 300 and f"0-1 s (max {stalled_ms:.0f} ms" in r.worst_seconds(2)


def test_the_slowest_seconds_are_named_with_how_many_answers_were_slow():
    r = openloop.RunResult(rate=2, duration=3)
    r.sent_at = [0.1, 0.6, 1.1, 1.6, 2.1, 2.6]
    r.latencies_ms = [20, 250, 30, 40, 900, 210]
    assert r.worst_seconds(2) == (
        "3 answers took 200 ms or more, in 2 of 3 seconds; slowest seconds: "
        "0-1 s (max 250 ms, 1 of 2 at 200 ms or more), 2-3 s (max 900 ms, 2 of 2 at 200 ms or more)")


async def test_requests_never_answered_are_counted_as_errors_not_left_out():
    async def request(session, i):
        if i % 2:
            await asyncio.sleep(3600)  # an answer that never comes (past every timeout)
        return 200

    r = await openloop.run(request, rate=20, duration=0.5, warmup=0.5, drain_seconds=0.3)
    assert r.sent == 10 and r.ok == 5 and r.errors == {"unfinished": 5}
    assert r.warmup_sent == 10 and len(r.warmup_latencies_ms) == 5 and r.warmup_errors == {"unfinished": 5}
    assert "ok 5 of 10" in r.warmup_line() and "unfinished×5" in r.warmup_line()
