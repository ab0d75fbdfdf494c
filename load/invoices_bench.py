"""Invoice creation under open-loop load, and the time to render a QR PNG.

    python -m load.invoices_bench                 # full run: 60 s per rate, as the target asks
    python -m load.invoices_bench --duration 15   # quicker look

Starts its own ``paysvc serve`` processes on a scratch database on the local PostgreSQL, drives
``POST /v1/invoices`` at fixed rates (latency from each request's scheduled send time), and reports:
p50/p99 at 200 requests/s; the highest rate held with p99 under 100 ms and no errors; QR render time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
import uuid

from load import openloop
from load.service import cli, scratch_database, services


def render_timings(n: int = 300) -> tuple[float, float, float]:
    from paysvc import khqr, qrimage

    data = khqr.KhqrData(bakong_account_id="passport@nbcq", currency="KHR", amount=50000,
                         merchant_name="Passport Office", merchant_city="Phnom Penh", bill_number="PS00012345",
                         language_preference="km", merchant_name_alternate="ការិយាល័យលិខិតឆ្លងដែន",
                         merchant_category_code="9399", created_at_ms=int(time.time() * 1000),
                         expires_at_ms=int(time.time() * 1000) + 600_000)
    payload = khqr.encode(data)
    png, svg = [], []
    # The service caches rendered codes; time the rendering itself (the first view of each new code).
    render_png, render_svg = qrimage.render_png.__wrapped__, qrimage.render_svg.__wrapped__
    for _ in range(n):
        qrimage._modules.cache_clear()  # a new code: its module matrix is computed afresh
        t = time.perf_counter()
        render_png(payload)
        png.append((time.perf_counter() - t) * 1000)
        qrimage._modules.cache_clear()
        t = time.perf_counter()
        render_svg(payload)
        svg.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    for _ in range(n):
        qrimage.render_png(payload)
    cached = (time.perf_counter() - t) * 1000 / n
    return statistics.median(png), statistics.median(svg), cached


def make_request(urls: list[str], key: str, idempotent: bool):
    rr = itertools.cycle(urls)
    run_id = uuid.uuid4().hex[:6]

    async def request(session, i: int) -> int:
        body = {"reference": f"B{run_id}-{i}", "description": "Passport fee", "currency": "KHR", "amount": 50000,
                "payer": {"name": "Sok Dara", "phone": "+855 12 345 678"}}
        headers = {"Authorization": f"Bearer {key}"}
        if idempotent:
            headers["Idempotency-Key"] = f"{run_id}-{i}"
        async with session.post(f"{next(rr)}/v1/invoices", json=body, headers=headers) as r:
            await r.read()
            if r.headers.get("Idempotent-Replayed"):
                return 598  # a replayed answer is not a created invoice: counted as an error
            return r.status
    return request


async def main_async(args, urls: list[str], key: str) -> None:
    print(f"\n== p50/p99 at 200 requests/s for {args.duration:.0f} s")
    # A new request factory per run: every run uses fresh references and Idempotency-Keys, so no request is
    # answered by replaying an earlier run's response.
    r = await openloop.run(make_request(urls, key, not args.no_idempotency), rate=200, duration=args.duration)
    print(r.line())
    print(f"\n== step up the rate, {args.duration:.0f} s each; held = p99 < 100 ms and no errors")
    best = None
    for rate in args.rates:
        r = await openloop.run(make_request(urls, key, not args.no_idempotency), rate=rate, duration=args.duration)
        held = r.pct(99) < 100 and not r.errors and r.ok == r.sent
        print(r.line() + ("   HELD" if held else "   not held"))
        if held:
            best = rate
        else:
            break
    print(f"\nhighest rate held for {args.duration:.0f} s with p99 < 100 ms: {best or 'none'} invoices/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--processes", type=int, default=2, help="paysvc serve processes (the machine has 2 cores)")
    p.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")],
                   default=[300, 400, 500, 600, 700, 800, 900, 1000, 1200])
    p.add_argument("--no-idempotency", action="store_true", help="send no Idempotency-Key headers")
    args = p.parse_args()
    png, svg, cached = render_timings()
    print(f"QR render, median of 300 (uncached): PNG {png:.2f} ms, SVG {svg:.2f} ms; "
          f"a cached PNG (the same code viewed again) {cached * 1000:.1f} µs")
    print(f"machine: {os.cpu_count()} cores; service processes: {args.processes}; PostgreSQL and the load "
          f"generator on the same machine")
    with scratch_database() as dsn:
        cli(dsn, "migrate")
        cli(dsn, "agencies", "add", "MOI", "--name", "Passport Office", "--name-km", "ការិយាល័យលិខិតឆ្លងដែន",
            "--bakong-account", "passport@nbcq")
        key = cli(dsn, "keys", "create", "--agency", "MOI", "--scope", "invoices:write", "--scope", "invoices:read")
        with services(dsn, args.processes, PAYSVC_PROVIDERS="sandbox") as urls:
            asyncio.run(main_async(args, urls, key))


if __name__ == "__main__":
    main()
