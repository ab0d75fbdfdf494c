"""An open-loop load generator: requests leave at a fixed rate whatever the server does.

Latency is measured from each request's *scheduled* send time, so a server that falls behind cannot
hide its queue (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from load.httpclient import Session


@dataclass
class RunResult:
    rate: float
    duration: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    late_starts: int = 0  # requests the generator itself could not send on time (> 5 ms late)
    ok_with_warmup: int = 0  # successful requests including the warm-up's (for costs per request)
    warmup: float = 0.0
    warmup_sent: int = 0
    warmup_latencies_ms: list[float] = field(default_factory=list)  # the warm-up's successful requests
    warmup_errors: dict[str, int] = field(default_factory=dict)
    sent_at: list[float] = field(default_factory=list)  # each measured latency's send time, s into the run
    error_at: list[float] = field(default_factory=list)  # each measured error's send time, s into the run

    def pct(self, p: float, *, warmup: bool = False) -> float:
        xs = sorted(self.warmup_latencies_ms if warmup else self.latencies_ms)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    @property
    def achieved(self) -> float:
        return self.ok / self.duration

    def line(self) -> str:
        errs = ", ".join(f"{k}×{v}" for k, v in sorted(self.errors.items())) or "none"
        return (f"rate {self.rate:7.0f}/s  ok {self.ok:7d}  achieved {self.achieved:7.1f}/s  "
                f"p50 {self.pct(50):7.1f} ms  p90 {self.pct(90):7.1f} ms  p99 {self.pct(99):7.1f} ms  "
                f"max {self.pct(100):7.1f} ms  generator-late {self.late_starts}  errors {errs}")

    def worst_seconds(self, k: int = 3) -> str:
        """The ``k`` one-second windows (by send time) with the slowest answers: whether a missed p99 came
        from a burst or a stall (a few seconds) or from the whole run."""
        by_second: dict[int, list[float]] = {}
        for t, ms in zip(self.sent_at, self.latencies_ms):
            by_second.setdefault(int(t), []).append(ms)
        over = sum(1 for ms in self.latencies_ms if ms >= 200)
        worst = sorted(by_second.items(), key=lambda kv: -max(kv[1]))[:k]
        out = (f"{over} answers took 200 ms or more, in {sum(1 for v in by_second.values() if max(v) >= 200)} of "
               f"{len(by_second)} seconds; slowest seconds: "
               + ", ".join(f"{s}-{s + 1} s (max {max(v):.0f} ms, {sum(1 for x in v if x >= 200)} of {len(v)} "
                           f"at 200 ms or more)" for s, v in sorted(worst)))
        if self.error_at:
            per: dict[int, int] = {}
            for t in self.error_at:
                per[int(t)] = per.get(int(t), 0) + 1
            out += f"; {len(self.error_at)} errors, sent in seconds " + ", ".join(
                f"{s}-{s + 1} ({n})" for s, n in sorted(per.items())[:10]) + ("…" if len(per) > 10 else "")
        return out

    def warmup_line(self) -> str:
        errs = ", ".join(f"{k}×{v}" for k, v in sorted(self.warmup_errors.items())) or "none"
        return (f"warm-up, first {self.warmup:g} s (not counted): ok {len(self.warmup_latencies_ms)} of "
                f"{self.warmup_sent}  p50 {self.pct(50, warmup=True):7.1f} ms  p99 {self.pct(99, warmup=True):7.1f} ms  "
                f"max {self.pct(100, warmup=True):7.1f} ms  errors {errs}")


Request = Callable[[Session, int], Awaitable[int]]


async def run(request: Request, *, rate: float, duration: float, warmup: float = 2.0,
              drain_seconds: float = 35.0) -> RunResult:
    """Send ``request(session, i)`` at ``rate`` per second for ``duration`` seconds (after a warm-up); then
    wait up to ``drain_seconds`` for the last answers (the client's own timeout is 30 s)."""
    result = RunResult(rate=rate, duration=duration, warmup=warmup)
    counter = itertools.count()
    # A lean keep-alive client (load/httpclient.py): the generator shares the cores with what it measures.
    async with Session(timeout=30) as session:
        tasks: dict[asyncio.Task, bool] = {}  # in flight, and whether each is measured
        loop = asyncio.get_running_loop()

        async def one(i: int, scheduled: float, measured: bool) -> None:
            try:
                status = await request(session, i)
                key = None if 200 <= status < 300 else f"HTTP {status}"
            except Exception as exc:  # count every failure kind; a load test must not stop on one
                key = type(exc).__name__
            if key is None:
                result.ok_with_warmup += 1
            if not measured:
                if key is None:
                    result.warmup_latencies_ms.append((loop.time() - scheduled) * 1000)
                else:
                    result.warmup_errors[key] = result.warmup_errors.get(key, 0) + 1
                return
            if key is None:
                result.ok += 1
                result.latencies_ms.append((loop.time() - scheduled) * 1000)
                result.sent_at.append(scheduled - start - warmup)
            else:
                result.errors[key] = result.errors.get(key, 0) + 1
                result.error_at.append(scheduled - start - warmup)

        total = warmup + duration
        start = loop.time() + 0.05
        interval = 1.0 / rate
        n = int(total * rate)
        for k in range(n):
            scheduled = start + k * interval
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                result.late_starts += 1
            measured = k * interval >= warmup
            if measured:
                result.sent += 1
            else:
                result.warmup_sent += 1
            t = asyncio.create_task(one(next(counter), scheduled, measured))
            tasks[t] = measured
            t.add_done_callback(lambda done: tasks.pop(done, None))
        if tasks:
            await asyncio.wait(list(tasks), timeout=drain_seconds)
        # Requests still without an answer (past every timeout: a connect that never completed, say) are
        # counted as errors, not left out, and stopped.
        for t, measured in list(tasks.items()):
            t.cancel()
            if measured:
                result.errors["unfinished"] = result.errors.get("unfinished", 0) + 1
            else:
                result.warmup_errors["unfinished"] = result.warmup_errors.get("unfinished", 0) + 1
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def now_ms() -> float:
    return time.perf_counter() * 1000
