"""Webhooks to portals, delivered to real local aiohttp receivers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from aiohttp import web
from aiohttp.test_utils import TestServer

from paysvc import api_invoices
from paysvc.web import POOL
from paysvc.webhook_targets import Destinations, client_session
from paysvc.webhooks import WebhookWorker
from tests.conftest import running_api

INSECURE_OK = dict(webhooks_allow_insecure_localhost=True)
LOOPBACK_OK = Destinations(allow_loopback=True)  # what INSECURE_OK gives the service's worker: receivers here are local


@dataclass
class Receiver:
    """A portal's endpoint: records each request; answers with the next queued status (200 when none)."""

    statuses: list[int] = field(default_factory=list)
    hang: bool = False
    requests: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((time.monotonic(), dict(request.headers), await request.read()))
        if self.hang:
            await asyncio.sleep(3600)
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver):
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/hook"))
    finally:
        await server.close()


def verify_hmac(secret: str, header: str, body: bytes) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) < 300


@contextlib.asynccontextmanager
async def worker_for(api, timeout: float = 5.0, destinations: Destinations = LOOPBACK_OK, resolver=None):
    async with client_session(destinations, resolver=resolver) as session:
        app = api.client.app
        yield WebhookWorker(app[POOL], app[api_invoices.CTX].cipher, session, destinations=destinations,
                            timeout=timeout)


async def register(api, headers, url: str, types=("invoice.created", "invoice.cancelled")) -> dict:
    r = await api.client.post("/v1/webhooks", json={"url": url, "event_types": list(types), "description": "portal"},
                              headers=headers)
    assert r.status == 201, await r.text()
    return await r.json()


async def test_register_requires_https_except_localhost_when_allowed(db_dsn):
    async with running_api(db_dsn) as api:
        headers = await api.portal("MOI")
        for url in ("http://portal.example/hook", "http://127.0.0.1:9/hook", "ftp://x/", "https://u:p@x/", "nonsense"):
            r = await api.client.post("/v1/webhooks", json={"url": url, "event_types": ["invoice.paid"]},
                                      headers=headers)
            assert r.status == 422, url
        r = await api.client.post("/v1/webhooks", json={"url": "https://x/", "event_types": ["invoice.nope"]},
                                  headers=headers)
        assert r.status == 422
        created = await register(api, headers, "https://portal.example/hook")
        assert created["secret"].startswith("whsec_") and len(created["secret"]) > 40
        r = await api.client.get("/v1/webhooks", headers=headers)
        listed = (await r.json())["data"]
        assert [w["id"] for w in listed] == [created["id"]] and "secret" not in listed[0]

        other = await api.portal("MPWT")
        assert (await api.client.get("/v1/webhooks", headers=other)).status == 200
        assert (await (await api.client.get("/v1/webhooks", headers=other)).json())["data"] == []
        assert (await api.client.delete(f"/v1/webhooks/{created['id']}", headers=other)).status == 404
        assert (await api.client.delete(f"/v1/webhooks/{created['id']}", headers=headers)).status == 204
        assert (await (await api.client.get("/v1/webhooks", headers=headers)).json())["data"] == []
        assert (await api.client.delete(f"/v1/webhooks/{created['id']}", headers=headers)).status == 404
    async with running_api(db_dsn, **INSECURE_OK) as api:
        headers = {"Authorization": f"Bearer {await api.key('MOI')}"}
        await register(api, headers, "http://127.0.0.1:9/hook")
        r = await api.client.post("/v1/webhooks", json={"url": "http://portal.example/", "event_types": ["invoice.paid"]},
                                  headers=headers)
        assert r.status == 422


async def test_deliveries_are_signed_filtered_by_type_and_listed(db_dsn, invoice_body):
    all_types, cancels = Receiver(), Receiver()
    async with running_api(db_dsn, **INSECURE_OK) as api, receiving(all_types) as url1, receiving(cancels) as url2:
        headers = await api.portal("MOI")
        await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)  # before: not delivered
        hook = await register(api, headers, url1)
        hook2 = await register(api, headers, url2, types=("invoice.cancelled",))
        r = await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
        invoice = await r.json()
        await api.client.post(f"/v1/invoices/{invoice['id']}/cancel", headers=headers)
        async with worker_for(api) as worker:
            attempts = await worker.run_once()
            assert len(attempts) == 3 and all(a.ok for a in attempts)
            assert await worker.run_once() == []  # each delivered once
        bodies = [json.loads(b) for _, _, b in all_types.requests]
        assert [(e["seq"], e["type"]) for e in sorted(bodies, key=lambda e: e["seq"])] == [
            (2, "invoice.created"), (3, "invoice.cancelled")]
        assert [json.loads(b)["type"] for _, _, b in cancels.requests] == ["invoice.cancelled"]
        for receiver, secret in ((all_types, hook["secret"]), (cancels, hook2["secret"])):
            for _, h, body in receiver.requests:
                assert verify_hmac(secret, h["Paysvc-Signature"], body)
                assert h["Content-Type"] == "application/json"
                assert h["Paysvc-Event-Id"] == json.loads(body)["event_id"]
        _, h, body = all_types.requests[0]
        assert not verify_hmac(hook2["secret"], h["Paysvc-Signature"], body)
        assert not verify_hmac(hook["secret"], h["Paysvc-Signature"], body + b" ")

        r = await api.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=headers)
        page = await r.json()
        assert [(d["seq"], d["event_type"], d["status"], d["attempts"]) for d in page["data"]] == [
            (3, "invoice.cancelled", "delivered", 1), (2, "invoice.created", "delivered", 1)]
        assert page["data"][0]["attempt_log"][0]["status_code"] == 200
        other = await api.portal("MPWT")
        assert (await api.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=other)).status == 404


async def test_a_failing_endpoint_is_retried_on_schedule_then_failed_then_replayed_by_hand(db_dsn, invoice_body):
    receiver = Receiver(statuses=[500] * 8)
    async with running_api(db_dsn, **INSECURE_OK) as api, receiving(receiver) as url:
        headers = await api.portal("MOI")
        hook = await register(api, headers, url, types=("invoice.created",))
        await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
        t0 = datetime.now(timezone.utc)
        now, times = t0, []
        async with worker_for(api) as worker:
            for _ in range(8):
                (attempt,) = await worker.run_once(now)
                assert not attempt.ok and attempt.status_code == 500 and attempt.error == "HTTP 500"
                times.append(now)
                if attempt.status == "failed":
                    break
                assert await worker.run_once(attempt.next_attempt_at - timedelta(seconds=1)) == [], "not due yet"
                now = attempt.next_attempt_at
            gaps = [round((b - a).total_seconds() / 60) for a, b in zip(times, times[1:])]
            assert gaps == [1, 5, 30, 120, 360, 720, 720]
            assert attempt.status == "failed" and times[-1] - t0 >= timedelta(hours=24)
            assert await worker.run_once(now + timedelta(days=2)) == []

            r = await api.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=headers)
            (delivery,) = (await r.json())["data"]
            assert delivery["status"] == "failed" and delivery["attempts"] == 8
            assert [a["status_code"] for a in delivery["attempt_log"]] == [500] * 8
            assert all(a["latency_ms"] >= 0 and a["error"] == "HTTP 500" for a in delivery["attempt_log"])

            r = await api.client.post(f"/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/replay", headers=headers)
            assert r.status == 202
            (attempt,) = await worker.run_once()
            assert attempt.ok and attempt.status == "delivered"
        r = await api.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=headers)
        (delivery,) = (await r.json())["data"]
        assert delivery["status"] == "delivered" and delivery["attempts"] == 9
        assert [(a["status_code"], a["manual"]) for a in delivery["attempt_log"]][-2:] == [(500, False), (200, True)]
        assert len(receiver.requests) == 9


async def test_a_replay_by_hand_is_on_top_of_the_automatic_attempts(db_dsn, invoice_body):
    """Found by a portal developer's walk-through: a replay while retries were still due used one of the eight."""
    receiver = Receiver(statuses=[500] * 20)
    async with running_api(db_dsn, **INSECURE_OK) as api, receiving(receiver) as url:
        headers = await api.portal("MOI")
        hook = await register(api, headers, url, types=("invoice.created",))
        await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
        async with worker_for(api) as worker:
            (attempt,) = await worker.run_once()
            assert attempt.status == "pending"
            (delivery,) = (await (await api.client.get(f"/v1/webhooks/{hook['id']}/deliveries",
                                                       headers=headers)).json())["data"]
            for _ in range(2):
                r = await api.client.post(f"/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/replay",
                                          headers=headers)
                assert r.status == 202
                (attempt,) = await worker.run_once()
                assert not attempt.ok and attempt.status == "pending"
            (delivery,) = (await (await api.client.get(f"/v1/webhooks/{hook['id']}/deliveries",
                                                       headers=headers)).json())["data"]
            assert (delivery["attempts"], delivery["max_attempts"]) == (3, 10)     # 8 automatic + 2 by hand
            assert [a["manual"] for a in delivery["attempt_log"]] == [False, True, True]
            # Asked twice before it is sent (a double click): one attempt more, not two (found by review)
            for _ in range(2):
                assert (await api.client.post(f"/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/replay",
                                              headers=headers)).status == 202
            (attempt,) = await worker.run_once()
            assert attempt.status == "pending"
            (delivery,) = (await (await api.client.get(f"/v1/webhooks/{hook['id']}/deliveries",
                                                       headers=headers)).json())["data"]
            assert (delivery["attempts"], delivery["max_attempts"]) == (4, 11)


async def test_a_dead_endpoint_does_not_delay_a_healthy_one(db_dsn, invoice_body):
    dead, healthy = Receiver(hang=True), Receiver()
    async with running_api(db_dsn, **INSECURE_OK) as api, receiving(dead) as dead_url, \
            receiving(healthy) as healthy_url:
        headers = await api.portal("MOI")
        dead_hook = await register(api, headers, dead_url)
        await register(api, headers, healthy_url)
        async with worker_for(api, timeout=2.0) as worker:
            task = asyncio.create_task(worker.run(interval=0.05))
            try:
                for n in (1, 2):
                    t = time.monotonic()
                    await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
                    while len(healthy.requests) < n:
                        await asyncio.sleep(0.01)
                    assert healthy.requests[-1][0] - t < 1.0, "the healthy endpoint got it at once"
                assert len(dead.requests) >= 1
                await asyncio.sleep(2.5)  # the dead endpoint's attempts time out
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        r = await api.client.get(f"/v1/webhooks/{dead_hook['id']}/deliveries", headers=headers)
        errors = [a["error"] for d in (await r.json())["data"] for a in d["attempt_log"]]
        assert errors and all(e == "no answer within 2 s" for e in errors)
