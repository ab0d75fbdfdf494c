"""/metrics shows what waits and for how long: the outbox by agency, the inbox by provider, webhook
deliveries, open reconciliation exceptions."""

from __future__ import annotations

import asyncpg
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from paysvc import backlog
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


async def test_metrics_show_what_waits_and_for_how_long(api, portal, invoice_body, monkeypatch):
    monkeypatch.setattr(backlog, "REFRESH_SECONDS", 0.0)
    await api.portal("MPWT")  # an agency with nothing waiting is shown at 0
    paid = await new_invoice(api, portal, invoice_body)
    short = await new_invoice(api, portal, invoice_body)
    assert (await pay(api.client, paid)).status == 200
    assert (await pay(api.client, short, amount=short["amount"] - 1)).status == 200  # underpaid: an exception
    conn = await asyncpg.connect(api.dsn)
    try:
        # A callback stored 90 s ago and never processed, as a crash between the two would leave it.
        crashed = await conn.fetchval(
            "INSERT INTO provider_inbox (provider, headers, body, received_at) "
            "VALUES ('sandbox', '{}', '\\x7b7d', now() - interval '90 seconds') RETURNING id")
        unpublished = await conn.fetchval(
            "SELECT count(*) FROM outbox_events o JOIN agencies a ON a.id = o.agency_id "
            "WHERE a.code = 'MOI' AND o.published_at IS NULL")
        m = await _metrics(api)
        assert unpublished >= 4 and _outbox(m, "MOI")[0] == unpublished  # no relay runs here
        assert _outbox(m, "MOI")[1] > 0
        assert _outbox(m, "MPWT") == (0, 0)
        assert m[("paysvc_inbox_unprocessed_callbacks", (("provider", "sandbox"),))] == 1
        assert m[("paysvc_inbox_oldest_unprocessed_seconds", (("provider", "sandbox"),))] >= 90
        assert m[("paysvc_reconciliation_open_exceptions", (("reason", "underpaid"),))] == 1
        assert ("paysvc_reconciliation_open_exceptions", (("reason", "overpaid"),)) not in m
        assert m[("paysvc_webhook_deliveries_pending", ())] == 0

        # A relay publishes MOI's events and the inbox worker processes the row: nothing waits any more.
        await conn.execute("UPDATE outbox_events SET published_at = now() WHERE published_at IS NULL")
        await conn.execute("UPDATE provider_inbox SET state = 'processed', processed_at = now() WHERE id = $1",
                           crashed)
        m = await _metrics(api)
        assert _outbox(m, "MOI") == (0, 0)
        assert m[("paysvc_inbox_unprocessed_callbacks", (("provider", "sandbox"),))] == 0  # a configured provider
        assert m[("paysvc_inbox_oldest_unprocessed_seconds", (("provider", "sandbox"),))] == 0
    finally:
        await conn.close()


async def test_the_backlog_is_read_at_most_every_few_seconds_and_a_failed_read_keeps_the_last_values(
        api, portal, invoice_body, monkeypatch):
    await new_invoice(api, portal, invoice_body)
    first = _outbox(await _metrics(api), "MOI")
    assert first[0] == 1
    await new_invoice(api, portal, invoice_body)
    assert _outbox(await _metrics(api), "MOI") == first  # read less than REFRESH_SECONDS ago: not read again

    monkeypatch.setattr(backlog, "REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(backlog, "TIMEOUT_SECONDS", 0.0)  # every read now gives up at once
    failures = prometheus_client.REGISTRY.get_sample_value("paysvc_backlog_read_failures_total")
    m = await _metrics(api)  # the scrape still answers
    assert _outbox(m, "MOI")[0] == 1
    assert prometheus_client.REGISTRY.get_sample_value("paysvc_backlog_read_failures_total") == failures + 1
