"""Business days: a calendar day in Asia/Phnom_Penh that ends at a configurable cut-off. Pure.

A payment belongs to the business day of the moment the provider says it was paid (``payments.paid_at``).
Day ``D`` holds the instants after ``D-1`` at the cut-off and up to ``D`` at the cut-off, local time; a
payment after the cut-off belongs to the next day. The default cut-off, ``23:59:59.999``, makes a business
day the calendar day (to the millisecond). Cambodia keeps no daylight-saving time, but the zone database
is used anyway, so the rule is written once and right.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

TIME_ZONE_NAME = "Asia/Phnom_Penh"
TZ = ZoneInfo(TIME_ZONE_NAME)
DEFAULT_CUTOFF = "23:59:59.999"


def parse_cutoff(text: str) -> time:
    """``HH:MM``, ``HH:MM:SS`` or ``HH:MM:SS.fff`` local time; raises ``ValueError`` naming the format."""
    try:
        value = time.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cut-off {text!r} is not a time like 23:59:59.999 or 18:00") from None
    if value.tzinfo is not None:
        raise ValueError("the cut-off is a local time in Asia/Phnom_Penh: give it without an offset")
    return value


def business_date(instant: datetime, cutoff: time) -> date:
    """The business day an aware instant belongs to."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError("business_date needs an aware datetime")
    local = instant.astimezone(TZ)
    day = local.date()
    return day + timedelta(days=1) if local.time().replace(tzinfo=None) > cutoff else day


def window(day: date, cutoff: time) -> tuple[datetime, datetime]:
    """``(start, end)`` in UTC: day ``day`` holds the instants ``start < t <= end``."""
    end = datetime.combine(day, cutoff, tzinfo=TZ)
    start = datetime.combine(day - timedelta(days=1), cutoff, tzinfo=TZ)
    return start.astimezone(timezone.utc), end.astimezone(timezone.utc)


def grace_over(day: date, today: date, grace_days: int) -> bool:
    """Whether a payment of ``day`` still unsettled on business day ``today`` is overdue.

    With a grace of 2, a payment of Monday may still arrive in Tuesday's or Wednesday's file; on Thursday
    it is missing. Business days here are calendar days: the service keeps no holiday calendar.
    """
    return (today - day).days > grace_days


def last_day_in_grace(today: date, grace_days: int) -> date:
    """The latest business day whose unsettled payments are overdue on ``today``."""
    return today - timedelta(days=grace_days + 1)
