"""Events written in the same transaction as the change that caused them (transactional outbox)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from paysvc.queries import Q

EVENT_TYPES = (
    "invoice.created",
    "invoice.paid",
    "invoice.expired",
    "invoice.cancelled",
    "journal.posted",
    "settlement.reconciled",
    "reconciliation.exception_opened",
)


async def add_event(
    conn: asyncpg.Connection, *, agency_id: int, type: str, data: dict[str, Any], occurred_at: datetime
) -> uuid.UUID:
    """Append one event for ``agency_id`` with the agency's next sequence number.

    Call it last in the transaction: the per-agency counter row stays locked until commit, so the
    shorter the time after this call, the less concurrent writers for that agency wait.
    """
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    event_id = uuid.uuid4()
    await conn.execute(Q.outbox_add_event, event_id, agency_id, type, occurred_at, data)
    return event_id
