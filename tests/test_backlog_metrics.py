"""/metrics shows what waits and for how long: the outbox by agency, the inbox by provider, webhook
deliveries, open reconciliation exceptions."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import asyncpg
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from paysvc import backlog
from paysvc.queries import Q
from tests.payments_helpers import new_invoice, pay


async def _metrics(api) -> dict[tuple[str, tuple], float]:
    r = await api.client.get("/metrics")
    assert r.status == 200
    out = {}
    for family in text_string_to_metric_families(await r.text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _outbox(m, agency: str) -> tuple[float | None, float | None]:
    return (m.get(("paysvc_outbox_unpublished_events", (("agency", agency),))),
            m.get(("paysvc_outbox_oldest_unpublished_seconds", (("agency", agency),))))


def _sample(name: str) -> float | None:
    return prometheus_client.REGISTRY.get_sample_value(name)


async def test_metrics_show_what_waits_and_for_how_long(api, portal, invoice_body, monkeypatch):
    monkeypatch.setattr(backlog, "REFRESH_SECONDS", 0.0)
    await api.portal("MPWT")  # an agency with nothing waiting is shown at 0
    paid = await new_invoice(api, portal, invoice_body)
    short = await new_invoice(api, portal, invoice_body)
    assert (await pay(api.client, paid)).status == 200
    assert (await pay(api.client, short, amount=short["amount"] - 1)).status == 200  # underpaid: an exception
    conn = await asyncpg.connect(api.dsn)
    try:
        await conn.execute("SELECT outbox_sequence(NULL)")  # number the events, as the sequencer would
        moi = await conn.fetch("SELECT o.id FROM outbox_events o JOIN agencies a ON a.id = o.agency_id "
                               "WHERE a.code = 'MOI' AND o.published_at IS NULL ORDER BY o.seq")
        assert len(moi) >= 4  # no relay runs here
        # The next event to publish occurred 1,000 s ago; later ones (in seq order) say 5,000 s: the age shown
        # is the next one's, the wait of the agency's queue.
        await conn.execute("UPDATE outbox_events SET occurred_at = now() - interval '5000 seconds' "
                           "WHERE id = ANY($1)", [r["id"] for r in moi[1:]])
        await conn.execute("UPDATE outbox_events SET occurred_at = now() - interval '1000 seconds' WHERE id = $1",
                           moi[0]["id"])
        # A callback stored 90 s ago and never processed, as a crash between the two would leave it.
        crashed = await conn.fetchval(
            "INSERT INTO provider_inbox (provider, headers, body, received_at) "
            "VALUES ('sandbox', '{}', '\\x7b7d', now() - interval '90 seconds') RETURNING id")
        # Two webhook deliveries still to make: one due 300 s ago, one retry due in an hour.
        agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = 'MOI'")
        endpoint = uuid.uuid4()
        await conn.execute("INSERT INTO webhook_endpoints (id, agency_id, url, event_types, secret_key_id, "
                           "secret_blob, fanout_seq) VALUES ($1, $2, 'https://portal.example/hook', "
                           "'{invoice.created}', 'k', '\\x00', 0)", endpoint, agency_id)
        for event, due in ((moi[0]["id"], -300.0), (moi[1]["id"], 3600.0)):
            await conn.execute("INSERT INTO webhook_deliveries (id, endpoint_id, event_id, seq, max_attempts, "
                               "next_attempt_at, created_at) VALUES ($1, $2, $3, 1, 10, now() + make_interval(secs => $4), "
                               "now() - interval '2 hours')", uuid.uuid4(), endpoint, event, due)

        m = await _metrics(api)
        count, age = _outbox(m, "MOI")
        assert count == len(moi) and 1000 <= age < 1500
        assert _outbox(m, "MPWT") == (0, 0)
        assert m[("paysvc_inbox_unprocessed_callbacks", (("provider", "sandbox"),))] == 1
        assert 90 <= m[("paysvc_inbox_oldest_unprocessed_seconds", (("provider", "sandbox"),))] < 600
        assert m[("paysvc_reconciliation_open_exceptions", (("reason", "underpaid"),))] == 1
        assert 0 <= m[("paysvc_reconciliation_oldest_open_exception_seconds", (("reason", "underpaid"),))] < 600
        assert ("paysvc_reconciliation_open_exceptions", (("reason", "overpaid"),)) not in m
        assert m[("paysvc_webhook_deliveries_pending", ())] == 2
        assert 300 <= m[("paysvc_webhook_deliveries_overdue_seconds", ())] < 900  # not 2 hours: due, not made
        assert time.time() - m[("paysvc_backlog_last_read_timestamp_seconds", ())] < 60

        monkeypatch.setattr(backlog, "OUTBOX_COUNT_CAP", 2)
        assert _outbox(await _metrics(api), "MOI")[0] == 2

        # A relay publishes MOI's events, the inbox worker processes the row, webhooks go out, treasury
        # resolves the exception: nothing waits any more.
        await conn.execute("UPDATE outbox_events SET published_at = now() WHERE published_at IS NULL")
        await conn.execute("UPDATE provider_inbox SET state = 'processed', processed_at = now() WHERE id = $1",
                           crashed)
        await conn.execute("DELETE FROM webhook_deliveries")
        await conn.execute("UPDATE reconciliation_exceptions SET state = 'resolved', resolved_at = now(), "
                           "resolution = 'write_off', resolution_note = 'test', resolved_by = 'test'")
        m = await _metrics(api)
        assert _outbox(m, "MOI") == (0, 0)
        assert m[("paysvc_inbox_unprocessed_callbacks", (("provider", "sandbox"),))] == 0  # a configured provider
        assert m[("paysvc_inbox_oldest_unprocessed_seconds", (("provider", "sandbox"),))] == 0
        assert ("paysvc_reconciliation_open_exceptions", (("reason", "underpaid"),)) not in m
        assert m[("paysvc_webhook_deliveries_pending", ())] == 0
        assert m[("paysvc_webhook_deliveries_overdue_seconds", ())] == 0
    finally:
        await conn.close()


async def test_the_backlog_is_read_at_most_every_few_seconds(api, portal, invoice_body):
    await new_invoice(api, portal, invoice_body)
    first = _outbox(await _metrics(api), "MOI")
    assert first[0] == 1
    await new_invoice(api, portal, invoice_body)
    assert _outbox(await _metrics(api), "MOI") == first  # read less than REFRESH_SECONDS ago: not read again


def _queries(**replaced: str) -> SimpleNamespace:
    names = ("backlog_outbox", "backlog_inbox", "backlog_webhooks", "backlog_exceptions")
    return SimpleNamespace(**{n: replaced.get(n, getattr(Q, n)) for n in names})


async def test_a_failed_read_keeps_the_last_values_and_says_so(api, portal, invoice_body, monkeypatch):
    monkeypatch.setattr(backlog, "REFRESH_SECONDS", 0.0)
    await new_invoice(api, portal, invoice_body)
    assert _outbox(await _metrics(api), "MOI")[0] == 1
    read_at, failures = _sample("paysvc_backlog_last_read_timestamp_seconds"), _sample(
        "paysvc_backlog_read_failures_total")
    monkeypatch.setattr(backlog, "Q", _queries(backlog_inbox="SELECT no_such_column FROM provider_inbox"))
    m = await _metrics(api)  # the scrape still answers, with the last values
    assert _outbox(m, "MOI")[0] == 1
    assert _sample("paysvc_backlog_read_failures_total") == failures + 1
    assert _sample("paysvc_backlog_last_read_timestamp_seconds") == read_at


async def test_a_slow_read_does_not_hold_the_scrape_and_serves_the_next_one(api, portal, invoice_body,
                                                                              monkeypatch):
    """With the database slow (or its host gone silent), a scrape waits WAIT_SECONDS for the read, then
    answers with the last values; the read goes on, and the next scrape shows what it found. Scrapes meanwhile
    start no second read."""
    monkeypatch.setattr(backlog, "REFRESH_SECONDS", 0.0)
    await new_invoice(api, portal, invoice_body)
    assert _outbox(await _metrics(api), "MOI")[0] == 1
    slow = ("SELECT a.code, 7::bigint AS waiting, now() AS since "
            "FROM agencies a, pg_sleep(4) WHERE $1::int > 0")
    monkeypatch.setattr(backlog, "Q", _queries(backlog_outbox=slow))
    monkeypatch.setattr(backlog, "WAIT_SECONDS", 0.3)
    reads = 0
    read = backlog.Backlog._read

    async def counted(self, *args):
        nonlocal reads
        reads += 1
        await read(self, *args)
    monkeypatch.setattr(backlog.Backlog, "_read", counted)
    started = time.monotonic()
    assert _outbox(await _metrics(api), "MOI")[0] == 1  # the last values
    assert _outbox(await _metrics(api), "MOI")[0] == 1  # still reading
    assert time.monotonic() - started < 3, "a scrape waited for the slow read"
    assert reads == 1, "a second read started while the first was running"
    for _ in range(100):  # the slow read ends about 4 s after it started
        await asyncio.sleep(0.1)
        if _outbox(await _metrics(api), "MOI")[0] == 7:  # what the slow read found
            break
    else:
        raise AssertionError("the slow read's values never showed")
