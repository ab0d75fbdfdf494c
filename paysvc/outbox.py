"""Events written in the same transaction as the change that caused them (transactional outbox)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import prometheus_client

from paysvc.queries import Q

log = logging.getLogger(__name__)

WITHOUT_AGENCY = prometheus_client.Gauge(
    "paysvc_outbox_events_without_agency",
    "Events whose agency has no event counter: never numbered, so never published (should be 0)")
ORPHAN_CHECK_SECONDS = 60.0
_last_orphan_check = 0.0

EVENT_TYPES = (
    "invoice.created",
    "invoice.paid",
    "invoice.expired",
    "invoice.cancelled",
    "journal.posted",
    "settlement.reconciled",
    "reconciliation.exception_opened",
)


def journal_posted(entry, agency_code: str, **ids: Any) -> dict[str, Any]:
    """The ``data`` of a ``journal.posted`` event: ``entry`` (a posted ``ledger`` entry) with only the postings
    of ``agency_code``'s own accounts. ``ids`` name what the entry is about (``payment_id``, ``invoice_id``, and
    for a resolution ``exception_id``)."""
    return {
        "entry_id": entry.id, "kind": entry.kind, **ids, "effective_at": entry.effective_at.isoformat(),
        "postings": [{"account": p.account, "side": p.side, "amount": p.amount, "currency": p.currency}
                     for p in entry.postings if p.account.startswith(f"agency:{agency_code}:")],
    }


async def add_event(
    conn: asyncpg.Connection, *, agency_id: int, type: str, data: dict[str, Any], occurred_at: datetime
) -> uuid.UUID:
    """Append one event for ``agency_id``, committed with the caller's transaction.

    Its per-agency sequence number is given after commit by :func:`sequence`, in the order events
    were written, so writers of one agency never wait for each other here.
    """
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    event_id = uuid.uuid4()
    await conn.execute(Q.outbox_add_event, event_id, agency_id, type, occurred_at, data)
    return event_id


def events_args(events: list[tuple[int, str, dict[str, Any]]]) -> tuple[list[uuid.UUID], list[int], list[str], list[str]]:
    """Ids, agencies, types and JSON bodies of ``events`` as the arrays an ``unnest`` insert takes; types checked."""
    for _, type, _ in events:
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
    return ([uuid.uuid4() for _ in events], [a for a, _, _ in events], [t for _, t, _ in events],
            [json.dumps(d) for _, _, d in events])


async def sequence(conn: asyncpg.Connection, agency_ids: list[int] | None = None) -> int:
    """Give committed events their agencies' next sequence numbers; return how many were numbered.

    Numbers are per agency, without gaps, in the order events were written; once an agency's counter
    reads N, every event numbered up to N is committed and visible (the numbering commits with it).
    Safe to call from several places at once: an agency being numbered elsewhere is skipped.
    """
    return await conn.fetchval(Q.outbox_sequence, agency_ids)


async def events_without_agency(conn: asyncpg.Connection) -> int:
    """Count, export (``paysvc_outbox_events_without_agency``) and log the events the sequencer can never
    number: their agency has no event counter. Each event takes its agency id from a row its transaction
    read (migration 0032 dropped the events' foreign key to agencies, whose lock every capture queued on),
    so there should be none; one would otherwise wait in the outbox unseen."""
    row = await conn.fetchrow(Q.outbox_events_without_agency)
    WITHOUT_AGENCY.set(row["n"])
    if row["n"]:
        log.error("%d events name agencies without an event counter (ids %s; the oldest from %s): they are never "
                  "numbered or published; add the agency, or move the events to the right one",
                  row["n"], ", ".join(map(str, row["agency_ids"])), row["oldest"].isoformat())
    return row["n"]


async def sequence_pending(pool: asyncpg.Pool) -> str | None:
    """The background sequencer's pass; about once a minute it also looks for events it can never number."""
    global _last_orphan_check
    async with pool.acquire() as conn:
        n = await sequence(conn)
        if time.monotonic() - _last_orphan_check >= ORPHAN_CHECK_SECONDS:
            _last_orphan_check = time.monotonic()
            await events_without_agency(conn)
    return f"numbered {n} events" if n > 1000 else None
