"""The provider inbox: every callback is stored raw before anything else, then processed on its own.

A callback's row commits before the provider gets its 2xx. Processing (verify, parse, confirm with the
provider when the pattern asks for it, capture) runs in its own transaction; if the process dies in
between, the row is still ``received`` and the inbox worker picks it up once its lease runs out.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Mapping

import asyncpg
import prometheus_client
from multidict import CIMultiDict
from pydantic import ValidationError

from paysvc.capture import CaptureResult, DuplicateCapture, capture
from paysvc.db import execute_in_batches
from paysvc.invoicing import now_utc
from paysvc.queries import Q
from providers import NotConfirmed, PaymentNotice, PaymentPending, Provider, ProviderError, ProviderUnavailable
from providers.models import first_error

log = logging.getLogger(__name__)

CAPTURED = prometheus_client.Counter(
    "paysvc_payments_captured_total", "Payments captured, by provider, source and outcome (an exception "
    "reason, or 'captured')", ["provider", "source", "outcome"])

PLUGIN_FAULTS = prometheus_client.Counter(
    "paysvc_provider_plugin_faults_total", "Callbacks a provider plugin could not handle as its contract says (it "
    "raised other than a ProviderError, or returned other than valid notices of its own): kept, tried again later",
    ["provider"])

# While a request (or a worker) processes a row, no one else takes it; after this, anyone may.
LEASE = timedelta(seconds=60)
# A provider that does not know yet a transaction it just told us about (PayWay's NOT_FOUND) is asked again,
# with the inbox's backoff, for this long after it first said so, when the callback names an open invoice of
# ours; then it is rejected. Bounded so that an unsigned callback (which anyone can send, naming a guessable
# bill number) buys only a few calls to the provider (found by review: an hour of backoff made 13 calls of
# each such callback; counting tries, or time from the callback's arrival, let a provider outage use it up).
NOT_FOUND_PATIENCE = timedelta(minutes=2)
_NOT_FOUND_UNTIL = re.compile(r"NOT_FOUND asked again until (\S+)$")
MAX_BACKOFF = timedelta(hours=1)


@dataclass
class Outcome:
    state: str                          # processed | rejected | deferred
    reason: str | None = None
    error: ProviderError | None = None
    results: list[CaptureResult] = field(default_factory=list)


@dataclass(frozen=True)
class Stored:
    """An inbox row as written: what processing needs, so it need not read the row back."""

    id: int
    provider: str
    received_at: datetime
    headers: dict[str, str | list[str]]   # as stored: see keep_headers
    body: bytes
    state: str = "received"
    attempts: int = 0
    replay_of: int | None = None          # set when refused as a replay: the row first received
    reason: str | None = None             # as the row's reason column (why it was last deferred): none yet

    def __getitem__(self, key: str):  # read like a database row
        return getattr(self, key)


async def store(pool: asyncpg.Pool, provider: str, headers: Mapping[str, str], body: bytes,
                *, rejected: str | None = None, lease: timedelta = LEASE, replay_key: bytes | None = None) -> Stored:
    """Write the callback as received; commit before returning.

    The row is leased to the caller, who processes it at once; the worker takes it after ``lease``. With
    ``replay_key`` (see :func:`replay_key`), a callback whose key is already in the inbox is stored as
    rejected, naming the row first received (``Stored.replay_of``), and is never processed.
    """
    now = now_utc()
    kept = keep_headers(headers)
    state = "rejected" if rejected else "received"
    reason = _storable(rejected) if rejected else None
    key = None if rejected else replay_key
    inbox_id = await pool.fetchval(Q.inbox_insert, provider, now, kept, body, state, reason, now + lease, key)
    if inbox_id is not None:
        return Stored(inbox_id, provider, now, kept, body, state)
    first = await pool.fetchval(Q.inbox_replayed, provider, key)
    reason = f"replayed: the same signed timestamp and body were already received as inbox row {first}"
    inbox_id = await pool.fetchval(Q.inbox_insert, provider, now, kept, body, "rejected", reason, now + lease, None)
    return Stored(inbox_id, provider, now, kept, body, "rejected", replay_of=first)


def replay_key(provider: Provider, headers: Mapping[str, str], body: bytes, *, now: datetime) -> bytes | None:
    """The provider's replay key for this callback (see ``ProviderBase.replay_key``), or None: a provider
    without the method, or one that does not sign, gets no replay check; nor does a callback whose signature
    does not verify at ``now`` (its arrival). Only a genuine message may use up its key: a forged copy of a
    signed timestamp and body, stored first, would otherwise have the genuine one refused as its replay (found
    by review). The forged one is refused all the same when it is processed."""
    key_of = getattr(provider, "replay_key", None)
    if key_of is None:
        return None
    try:
        provider.verify_callback(headers, bytes(body), now=now)
        key = key_of(headers, bytes(body))
    except ProviderError:
        return None
    except Exception:
        # A plugin's own defect must not keep the callback from being stored (found by a bank integrator's
        # walk-through: it answered 500 and kept nothing); processing meets it again and keeps the row.
        log.exception("the %s plugin failed computing a callback's replay key; stored without one", provider.name)
        PLUGIN_FAULTS.labels(provider.name).inc()  # replay protection is off for it: seen in the metric, not only the log
        return None
    if key is not None and not isinstance(key, bytes):
        log.error("the %s plugin's replay_key returned %s, not bytes; stored without one", provider.name,
                  type(key).__name__)
        PLUGIN_FAULTS.labels(provider.name).inc()
        return None
    return key


class PluginFault(Exception):
    """A provider plugin did something its contract forbids (raised other than a ProviderError, or gave back
    something other than confirmed notices of its own). The callback is kept and retried with backoff, so a
    fixed plugin processes it; it is never rejected for a defect that is not the sender's."""


def checked_notices(provider: str, notices: object, *, confirmed: bool = True) -> list[PaymentNotice]:
    """The plugin's notices, checked as the service relies on them: a list of PaymentNotice, each valid (one
    built with model_construct skips pydantic's rules), under the plugin's own name (found by a bank
    integrator's walk-through: a plugin could book payments into another provider's clearing account), and
    confirmed when about to be captured."""
    if not isinstance(notices, (list, tuple)) or not all(isinstance(n, PaymentNotice) for n in notices):
        raise PluginFault(f"the {provider} plugin returned {type(notices).__name__}, not a list of PaymentNotice")
    out = []
    for n in notices:
        if n.provider != provider:
            raise PluginFault(f"the {provider} plugin returned a notice for provider {n.provider!r}: a plugin reports "
                              "only its own payments")
        if confirmed and not n.confirmed:
            raise PluginFault(f"the {provider} plugin returned an unconfirmed notice to capture ({n.transaction_id!r})")
        try:
            out.append(PaymentNotice.model_validate(n.model_dump()))
        except ValidationError as exc:
            raise PluginFault(f"the {provider} plugin returned a notice that is not valid: {first_error(exc)}") from None
    return out


def keep_headers(headers: Mapping[str, str]) -> dict[str, str | list[str]]:
    """Every header as received, as a JSON object: a name sent once maps to its value, a name sent more than
    once (same spelling) to the list of its values in order. Rows stored before repetitions were kept hold
    only strings, and read the same way (:func:`header_multidict`)."""
    kept: dict[str, str | list[str]] = {}
    for k, v in headers.items():  # a multidict yields each repetition
        k, v = _storable(k), _storable(v)
        if k not in kept:
            kept[k] = v
        elif isinstance(kept[k], list):
            kept[k].append(v)  # type: ignore[union-attr]
        else:
            kept[k] = [kept[k], v]  # type: ignore[list-item]
    return kept


def header_multidict(stored: Mapping[str, str | list[str]]) -> CIMultiDict:
    """The stored headers as the provider reads them: case-insensitive, every repetition kept."""
    out: CIMultiDict = CIMultiDict()
    for k, v in stored.items():
        for one in v if isinstance(v, list) else [v]:
            out.add(k, one)
    return out


def _storable(text: str) -> str:
    """Header text as PostgreSQL can store it: bytes that were not UTF-8 (kept by aiohttp as surrogates)
    written as ``\\xNN`` escapes, NUL as ``\\x00``. The body is stored as the exact bytes received."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


async def capture_notices(pool: asyncpg.Pool, notices: list[PaymentNotice], *, source: str,
                          inbox_id: int | None = None, received_at: datetime | None = None,
                          business_cutoff: time | None = None) -> list[CaptureResult]:
    """Capture each notice in its own transaction (a concurrent duplicate is retried and found).

    With ``inbox_id``, the last transaction also marks that inbox row processed: the row is done exactly
    when its payments are, and no extra commit is spent on it. ``received_at`` is when the notices reached
    us (the callback's arrival; default: the time of capture).
    """
    results = []
    for i, notice in enumerate(notices):
        last = i == len(notices) - 1
        for attempt in range(3):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    now = now_utc()
                    result = await capture(conn, notice, source=source, now=now, inbox_id=inbox_id,
                                           completes_inbox=last and inbox_id is not None, received_at=received_at,
                                           business_cutoff=business_cutoff)
                results.append(result)
                if result.created:  # counted once committed
                    CAPTURED.labels(notice.provider, source, result.reason or "captured").inc()
                break
            except DuplicateCapture:
                if attempt == 2:
                    raise
            except asyncpg.DeadlockDetectedError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
    if not notices and inbox_id is not None:
        await pool.execute(Q.inbox_processed, inbox_id, now_utc())
    return results


async def process(pool: asyncpg.Pool, providers: Mapping[str, Provider], inbox_id: int,
                  stored: Stored | None = None, *, business_cutoff: time | None = None) -> Outcome:
    """Verify, parse, confirm and capture one inbox row. Safe to run more than once for a row.

    ``stored`` is the row just written by this process (not read back); the worker passes only the id.
    """
    row = stored if stored is not None else await pool.fetchrow(Q.inbox_get, inbox_id)
    if row is None or row["state"] != "received":
        return Outcome(row["state"] if row else "missing")
    provider = providers.get(row["provider"])
    if provider is None:
        return await _defer(pool, row, f"provider {row['provider']!r} is not enabled on this instance")
    headers = header_multidict(row["headers"])
    body = bytes(row["body"])
    try:
        # The signature's time window is judged at arrival, so a row recovered after a crash still verifies.
        provider.verify_callback(headers, body, now=row["received_at"])
        notices = checked_notices(provider.name, provider.parse_callback(headers, body),
                                  confirmed=provider.pattern != "push_confirm")
    except ProviderError as exc:
        await _reject(pool, inbox_id, exc)
        return Outcome("rejected", str(exc), exc)
    except Exception as exc:
        return await _plugin_fault(pool, row, provider.name, exc)
    if provider.pattern == "push_confirm":
        confirmed = []
        for n in notices:
            try:
                confirmed.append(await provider.confirm(n))
            except PaymentPending as exc:
                # Not approved *yet*: ask again later rather than drop a payment that is on its way.
                return await _defer(pool, row, f"{exc.code}: {exc}")
            except NotConfirmed as exc:
                until = _not_found_until(row)
                if (exc.status == "NOT_FOUND" and n.bill_number is not None and now_utc() < until
                        and await pool.fetchval(Q.inbox_bill_is_ours, n.bill_number)):
                    # Found by review: a status API that lags its own callback by a moment would otherwise make
                    # an approved payment's only callback final, leaving the money to the settlement file.
                    return await _defer(pool, row, f"{exc.code}: {exc}; NOT_FOUND asked again until "
                                                   f"{until.isoformat()}")
                await _reject(pool, inbox_id, exc)
                return Outcome("rejected", str(exc), exc)
            except ProviderUnavailable as exc:
                return await _defer(pool, row, f"{exc.code}: {exc}", retry_after=exc.retry_after)
            except ProviderError:
                raise  # another failure of the provider's API (our credentials refused, say): retried as it was
            except Exception as exc:
                return await _plugin_fault(pool, row, provider.name, exc)
        try:
            notices = checked_notices(provider.name, confirmed)
        except PluginFault as exc:
            return await _plugin_fault(pool, row, provider.name, exc)
    results = await capture_notices(pool, notices, source="callback", inbox_id=inbox_id,
                                    received_at=row["received_at"], business_cutoff=business_cutoff)
    return Outcome("processed", results=results)


async def _plugin_fault(pool: asyncpg.Pool, row, provider: str, exc: Exception) -> Outcome:
    """Keep the row and try again later, ever more slowly (to an hour): the defect is the plugin's, and a fixed
    plugin processes what it could not (before: retried every minute with a traceback each time)."""
    why = str(exc) if isinstance(exc, PluginFault) else f"the {provider} plugin failed: {type(exc).__name__}: {exc}"
    log.error("inbox row %s: %s; kept, tried again later", row["id"], why, extra={"inbox_id": row["id"]},
              exc_info=not isinstance(exc, PluginFault))
    PLUGIN_FAULTS.labels(provider).inc()
    return await _defer(pool, row, f"plugin_fault: {why}")


async def _reject(pool: asyncpg.Pool, inbox_id: int, exc: ProviderError) -> None:
    await pool.execute(Q.inbox_reject, inbox_id, _storable(f"{exc.code}: {exc}"))


def _not_found_until(row) -> datetime:
    """Until when a NOT_FOUND is asked again: the time its first NOT_FOUND set (kept in the row's reason), or,
    for a first one, NOT_FOUND_PATIENCE from now."""
    found = _NOT_FOUND_UNTIL.search(row["reason"] or "")
    if found:
        try:
            return datetime.fromisoformat(found.group(1))
        except ValueError:
            pass
    return now_utc() + NOT_FOUND_PATIENCE


async def _defer(pool: asyncpg.Pool, row, reason: str, retry_after: float | None = None) -> Outcome:
    wait = timedelta(seconds=retry_after) if retry_after else min(timedelta(seconds=2 ** min(row["attempts"], 12)),
                                                                   MAX_BACKOFF)
    kept = _NOT_FOUND_UNTIL.search(row["reason"] or "")
    if kept and not _NOT_FOUND_UNTIL.search(reason):
        # A NOT_FOUND window once opened is kept through other deferrals (found by review: a 503 in between
        # erased it, and the next NOT_FOUND opened a new one, again and again).
        reason = f"{reason}; {kept.group(0)}"
    await pool.execute(Q.inbox_defer, row["id"], now_utc() + wait, _storable(reason))
    log.warning("inbox row %s deferred: %s", row["id"], reason, extra={"inbox_id": row["id"]})
    return Outcome("deferred", reason)


async def work(pool: asyncpg.Pool, providers: Mapping[str, Provider], *, batch: int = 100,
               lease: timedelta = LEASE, business_cutoff: time | None = None) -> str | None:
    """Process due inbox rows (new ones whose request died, and deferred ones). Safe on several instances."""
    now = now_utc()
    ids = [r["id"] for r in await pool.fetch(Q.inbox_claim, batch, now, lease)]
    done = 0
    for inbox_id in ids:
        try:
            out = await process(pool, providers, inbox_id, business_cutoff=business_cutoff)
            done += out.state == "processed"
        except Exception:
            log.exception("inbox row %s failed; it will be retried", inbox_id, extra={"inbox_id": inbox_id})
    return f"processed {done} of {len(ids)} inbox rows" if ids else None




async def prune_rejected(pool: asyncpg.Pool, *, retention: timedelta, batch: int = 500) -> str | None:
    """Delete rejected callbacks older than ``retention`` (evidence kept that long; see the setting)."""
    total = await execute_in_batches(pool, Q.inbox_prune_rejected, now_utc() - retention, batch=batch)
    return f"pruned {total} rejected callbacks" if total else None
