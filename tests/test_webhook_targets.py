"""Webhooks go only to public internet addresses: refused at registration, and again at every delivery (a name
can resolve to anything, and change after registration), unless the operator allows a network."""

from __future__ import annotations

import socket
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from aiohttp.abc import AbstractResolver
from yarl import URL

from paysvc.settings import SettingsError, load_settings
from paysvc.web import POOL
from paysvc.webhook_targets import (Blocked, Destinations, GuardedResolver, client_session,
                                    destinations_from_settings, parse_networks)
from tests.conftest import running_api
from tests.test_events_webhooks import INSECURE_OK, Receiver, receiving, register, worker_for

REVIEWER = ["https://169.254.169.254/latest", "https://127.0.0.1/hook", "https://[::1]/hook", "https://10.0.0.1/hook",
            "https://localhost/hook"]
DISGUISED = [
    "https://[::ffff:127.0.0.1]/hook", "https://[::ffff:a9fe:a9fe]/latest",   # IPv4-mapped IPv6
    "https://[64:ff9b::a00:1]/hook", "https://[2002:a00:1::]/hook",           # NAT64 and 6to4 wrapping 10.0.0.1
    "https://2130706433/hook", "https://0x7f000001/hook", "https://0177.0.0.1/hook", "https://127.1/hook",
    "https://127。0。0。1/hook",                                                # what the C library / IDNA read
    "https://localhost./hook", "https://LOCALHOST/hook", "https://portal.localhost/hook", "https://127.0.0.1./hook",
    "https://[fe80::1%25eth0]/hook", "https://[fd00::1]/hook", "https://100.64.0.1/hook", "https://172.16.0.1/hook",
    "https://192.168.1.1/hook", "https://0.0.0.0/hook", "https://[::]/hook", "https://224.0.0.1/hook",
    "https://[ff02::1]/hook", "https://255.255.255.255/hook", "https://[::127.0.0.1]/hook",
]


class FakeDNS(AbstractResolver):
    """A name server answering from a table (as an attacker's would); records every question."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV} for a in self.table[host]]

    async def close(self):
        pass


async def refused(api, headers, url: str) -> str:
    r = await api.client.post("/v1/webhooks", json={"url": url, "event_types": ["invoice.paid"]}, headers=headers)
    assert r.status == 422, (url, await r.text())
    body = await r.json()
    assert body["errors"] == [{"field": "url", "message": body["detail"], "code": "value_error"}], url
    assert "public internet addresses" in body["detail"], url
    return body["detail"]


async def test_internal_addresses_are_refused_at_registration_whatever_their_spelling(db_dsn):
    async with running_api(db_dsn) as api:
        headers = await api.portal("MOI")
        for url in REVIEWER + DISGUISED:
            await refused(api, headers, url)
        assert "169.254.169.254 is a link-local address (where cloud metadata" in await refused(api, headers,
                                                                                              REVIEWER[0])
        assert "localhost names the service's own machine" in await refused(api, headers, "https://localhost/hook")
        assert "0x7f000001 is the IPv4 address 127.0.0.1 written another way" in await refused(
            api, headers, "https://0x7f000001/hook")
        assert "write it as 8.8.8.8" in await refused(api, headers, "https://134744072/hook")
        assert "::ffff:a9fe:a9fe stands for 169.254.169.254" in await refused(api, headers, DISGUISED[1])
        assert (await (await api.client.get("/v1/webhooks", headers=headers)).json())["data"] == []
        for url in ("https://portal.example/hook", "https://8.8.8.8/hook", "https://[2606:4700:4700::1111]/hook",
                    "https://[::ffff:8.8.8.8]/hook", "https://[64:ff9b::808:808]/hook"):
            await register(api, headers, url)


async def test_a_url_whose_host_is_no_host_name_is_refused_at_registration(db_dsn):
    # Found by a fuzz audit: accepted with 201, then every delivery failed inside the resolver (UnicodeError,
    # not a ClientError), so no attempt was recorded and the delivery sat pending with no reason given.
    async with running_api(db_dsn) as api:
        headers = await api.portal("MOI")
        for url, says in (("https://.com/", "not a host name"), (f"https://{'a' * 70}.com/", "not a host name"),
                          ("https://1.1.1.1.1/", "its last label is all digits"),
                          ("https://%31%32%37.0.0.1/", "not a host name"),
                          ("https://\u0661\u0662\u0667.0.0.1/", "its last label is all digits")):
            assert says in await refused(api, headers, url), url
        for url in ("https://portal.example/hook", "https://xn--nxasmq6b.example/hook",
                    "https://\u1780\u17b6\u179a.gov.kh/hook", "https://a-b.c-d.example/hook"):
            await register(api, headers, url)


async def test_a_send_that_fails_outside_aiohttp_is_recorded_as_an_attempt(db_dsn, invoice_body):
    class BrokenDNS(FakeDNS):
        async def resolve(self, host, port=0, family=socket.AF_INET):
            raise UnicodeError("label empty or too long")

    async with running_api(db_dsn) as api:
        headers = await api.portal("MOI")
        await register(api, headers, "https://portal.example/hook", types=("invoice.created",))
        await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
        async with worker_for(api, destinations=Destinations(), resolver=BrokenDNS({})) as worker:
            (attempt,) = await worker.run_once()
        assert attempt.error == "UnicodeError: label empty or too long" and attempt.status == "pending"


async def test_insecure_localhost_allows_loopback_and_nothing_else(db_dsn):
    async with running_api(db_dsn, **INSECURE_OK) as api:
        headers = await api.portal("MOI")
        for url in ("https://127.0.0.1/hook", "https://[::1]/hook", "https://localhost/hook", "http://localhost:9/hook",
                    "http://[::1]:9/hook", "https://[::ffff:127.0.0.1]/hook"):
            await register(api, headers, url)
        for url in ("https://169.254.169.254/latest", "https://10.0.0.1/hook", "https://192.168.1.1/hook"):
            await refused(api, headers, url)


async def test_allowed_networks_let_their_addresses_through(db_dsn):
    async with running_api(db_dsn, webhooks_allowed_networks="10.20.0.0/16, fd00:20::/32") as api:
        headers = await api.portal("MOI")
        for url in ("https://10.20.3.4/hook", "https://[fd00:20::5]/hook", "https://[::ffff:10.20.3.4]/hook"):
            await register(api, headers, url)
        for url in ("https://10.21.0.1/hook", "https://127.0.0.1/hook", "https://169.254.169.254/latest",
                    "https://localhost/hook"):
            await refused(api, headers, url)


def test_allowed_networks_are_checked_at_start(monkeypatch):
    for bad in ("10.0.0.1/8", "10.20.0.0/16,nonsense", "10.20.0.0/33"):
        monkeypatch.setenv("PAYSVC_WEBHOOKS_ALLOWED_NETWORKS", bad)
        with pytest.raises(SettingsError) as err:
            load_settings()
        assert "PAYSVC_WEBHOOKS_ALLOWED_NETWORKS" in str(err.value) and "CIDR" in str(err.value), bad
    monkeypatch.setenv("PAYSVC_WEBHOOKS_ALLOWED_NETWORKS", " 10.20.0.0/16 , fd00:20::/32,")
    settings = load_settings()
    assert settings.webhooks_allowed_networks == "10.20.0.0/16,fd00:20::/32"
    assert destinations_from_settings(settings) == Destinations(parse_networks("10.20.0.0/16,fd00:20::/32"))


async def test_the_resolver_drops_every_address_that_is_not_allowed():
    dns = FakeDNS({"mixed.example": ["10.0.0.7", "93.184.215.14", "::1"],
                   "internal.example": ["10.0.0.7", "169.254.169.254", "::ffff:127.0.0.1", "fe80::1%eth0"]})
    guarded = GuardedResolver(Destinations(), dns)
    assert [r["host"] for r in await guarded.resolve("mixed.example", 443)] == ["93.184.215.14"]
    with pytest.raises(Blocked) as err:
        await guarded.resolve("internal.example", 443)
    assert err.value.strerror.startswith("not sent: internal.example resolves only to addresses webhooks may not "
                                         "reach: 10.0.0.7 is a private-network address; 169.254.169.254 is a link")
    assert "::ffff:7f00:1 stands for 127.0.0.1" in err.value.strerror and "fe80::1%eth0 is a link" in err.value.strerror
    allowing = GuardedResolver(Destinations(parse_networks("10.0.0.0/24")), dns)
    assert [r["host"] for r in await allowing.resolve("internal.example", 443)] == ["10.0.0.7"]


async def _aim(api, hook: dict, url: str) -> None:
    """Point an endpoint at ``url`` behind the API's back: the name's DNS answer changed after registration."""
    await api.client.app[POOL].execute("UPDATE webhook_endpoints SET url = $1 WHERE id = $2", url,
                                       uuid.UUID(hook["id"]))


async def test_a_name_that_resolves_to_a_private_address_is_not_sent_to_until_its_network_is_allowed(
        db_dsn, invoice_body):
    receiver = Receiver()
    async with running_api(db_dsn) as api, receiving(receiver) as url:
        headers = await api.portal("MOI")
        hook = await register(api, headers, "https://hooks.moi.example/paysvc", types=("invoice.created",))
        # The receiver here speaks plain HTTP on 127.0.0.1; the name now resolves there (DNS rebinding).
        await _aim(api, hook, f"http://hooks.moi.example:{URL(url).port}/hook")
        await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
        dns = FakeDNS({"hooks.moi.example": ["127.0.0.1"]})
        now = datetime.now(timezone.utc)
        async with worker_for(api, destinations=Destinations(), resolver=dns) as worker:
            (attempt,) = await worker.run_once(now)
        assert dns.asked == ["hooks.moi.example"] and receiver.requests == []
        assert not attempt.ok and attempt.status_code is None and attempt.status == "pending"
        assert attempt.error == ("not sent: hooks.moi.example resolves only to addresses webhooks may not reach: "
                                 "127.0.0.1 is a loopback address (the service's own machine)")
        assert timedelta(minutes=1) <= attempt.next_attempt_at - now < timedelta(minutes=1, seconds=5)  # as usual
        r = await api.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=headers)
        (delivery,) = (await r.json())["data"]
        assert delivery["last_error"] == attempt.error and delivery["attempt_log"][0]["error"] == attempt.error

        allowed = Destinations(parse_networks("127.0.0.0/8"))  # the operator allows the receiver's network
        async with worker_for(api, destinations=allowed, resolver=dns) as worker:
            (attempt,) = await worker.run_once(attempt.next_attempt_at)
        assert attempt.ok and attempt.status == "delivered" and len(receiver.requests) == 1


async def test_an_ip_literal_is_checked_before_sending_since_aiohttp_does_not_resolve_it(db_dsn, invoice_body):
    receiver = Receiver()
    async with running_api(db_dsn, **INSECURE_OK) as api, receiving(receiver) as url:
        headers = await api.portal("MOI")
        await register(api, headers, url, types=("invoice.created",))  # registered while loopback was allowed
        await api.client.post("/v1/invoices", json=invoice_body(), headers=headers)
        dns = FakeDNS({})
        async with client_session(Destinations(), resolver=dns) as session:  # aiohttp alone goes straight there
            async with session.post(url, data=b"{}") as r:
                assert r.status == 200
        assert dns.asked == [] and len(receiver.requests) == 1
        async with worker_for(api, destinations=Destinations(), resolver=dns) as worker:
            (attempt,) = await worker.run_once()
        assert attempt.error == ("not sent: 127.0.0.1 is a loopback address (the service's own machine); "
                                 "webhooks go only to public internet addresses")
        assert attempt.status == "pending" and len(receiver.requests) == 1
