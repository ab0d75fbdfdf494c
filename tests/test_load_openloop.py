"""The open-loop generator the benchmarks share: requests leave on schedule, latency counts from the schedule,
the warm-up is kept apart, and a missed p99 can be placed in time."""

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestServer

from load import openloop


async def test_latency_runs_from_the_schedule_and_the_warmup_is_kept_apart():
    stalled = asyncio.Event()

    async def handler(request):
        n = int((await request.read()) or 0)
        if n == 25 and not stalled.is_set():  # one request, in the measured part, is slow
            stalled.set()
            await asyncio.sleep(0.3)
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
    assert max(r.latencies_ms) >= 300  # the stalled request, timed from when it was due
    assert r.pct(50) < 100
    assert "slowest seconds: 0-1 s (max 3" in r.worst_seconds(1)  # the second it was sent in


def test_the_slowest_seconds_are_named_with_how_many_answers_were_slow():
    r = openloop.RunResult(rate=2, duration=3)
    r.sent_at = [0.1, 0.6, 1.1, 1.6, 2.1, 2.6]
    r.latencies_ms = [20, 250, 30, 40, 900, 210]
    assert r.worst_seconds(2) == (
        "3 answers took 200 ms or more, in 2 of 3 seconds; slowest seconds: "
        "0-1 s (max 250 ms, 1 of 2 at 200 ms or more), 2-3 s (max 900 ms, 2 of 2 at 200 ms or more)")
