"""Polling pull providers (Bakong): ask about every code still payable or recently expired.

A code is asked about until the answer to a call made once its grace was over (``PollPolicy.grace`` after it
expired) is read in full and says nothing more about it, however long after its grace that comes (an outage,
a refused token), up to ``PollPolicy.give_up`` after it expired (``khqr_codes.poll_pending``, migration 0037).

A pass claims up to ``PollPolicy.batch`` due codes with a lease (``FOR NO KEY UPDATE SKIP LOCKED``, leased
codes skipped), then asks about them one provider call at a time, at most ``provider.poll_batch_size``
codes a call (≤ 50 for Bakong), each call cut off after ``PollPolicy.call_timeout``. Before a call that
would start with less than half the lease left, the lease of every code the pass still holds is renewed,
so a lease always outlasts the call made under it and the capture of its answer: several service
instances never ask about the same md5 at once, however slow the provider. Leases, and when codes were last
asked, are set and judged by the database's clock; a pass measures the time its lease has left with its own
monotonic clock, from before the claim was sent (so it can only think it has less), so instances whose
clocks differ never take each other's codes. Renewal and release touch only
the caller's own lease (the expiry its claim or last renewal set), never one another instance took over;
a code whose lease was lost is dropped from the pass.

What a call reported is captured, and its codes released, before the next call is made, so a later call
that fails (429, 5xx, a timeout) costs nothing already learned; the codes not yet asked are freed without
being marked asked. A provider that answers 429 or 5xx, or cannot be read at all, makes the poller back
off. An item of an answer that cannot be read is not an outage: the provider skips it and reports it, the
poller logs it at ERROR (with its md5 and why) and counts it each time it is seen, and the code stays open,
asked about again on every pass, up to the give-up time (an answer that could not be read about a code does not
end its polling; nor does any answer with an item that names no code of its call).
"""

from __future__ import annotations

import asyncio
import logging
import time as clock
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta

import asyncpg
import prometheus_client

from paysvc.background import backoff, pause, stop_if_cancelled
from paysvc.inbox import capture_notices, checked_notices
from paysvc.queries import Q
from paysvc import provider_tokens
from paysvc.pii import PiiCipher
from providers import (PendingKhqr, Provider, ProviderAuthError, ProviderError, ProviderUnavailable, TokenRefused,
                       UnreadableItem)

log = logging.getLogger(__name__)

UNREADABLE = prometheus_client.Counter(
    "paysvc_poll_unreadable_items_total", "Items of a pull provider's answer that could not be read and were "
    "skipped, by provider and whether the provider said the code was paid (paid=yes: money moved that the "
    "poll could not book)", ["provider", "paid"])
FAILURES = prometheus_client.Counter(
    "paysvc_poll_failures_total", "Poll passes of a pull provider that failed, by provider and error (e.g. "
    "ProviderAuthError: an expired token, renewed when PAYSVC_BAKONG_EMAIL is set, or another refusal; "
    "ProviderUnavailable: 429, 5xx, timeouts, unreadable answers)", ["provider", "error"])
RENEWALS = prometheus_client.Counter(
    "paysvc_provider_token_renewals_total", "Tokens of a pull provider renewed by this process after the provider "
    "refused the one in use, by provider and outcome (renewed; shared: another instance's renewed token taken; "
    "refused, failed: the renewal; waiting: too soon after the last renewal)", ["provider", "outcome"])
LAST_SUCCESS = prometheus_client.Gauge(
    "paysvc_poll_last_success_timestamp_seconds", "When the poller of a pull provider last read an answer to a "
    "call, or finished a pass with every due code asked (or none due) (Unix time): stale means the poller "
    "fails (see paysvc_poll_failures_total) or has stopped", ["provider"])


@dataclass(frozen=True)
class PollPolicy:
    grace: timedelta = timedelta(minutes=30)         # a code is done once answered about this long after it expired
    give_up: timedelta = timedelta(hours=72)         # ... or once it expired this long ago, answered or not
    min_interval: timedelta = timedelta(seconds=5)   # don't ask about one code more often than this
    batch: int = 500                                 # codes claimed per pass (asked ≤ poll_batch_size a call)
    lease: timedelta = timedelta(seconds=60)         # a claim's hold on its codes; renewed before a call that
                                                     # would start with less than half of it left
    call_timeout: timedelta = timedelta(seconds=20)  # one provider.poll() call is given up after this
    business_cutoff: time | None = None              # dates the exceptions it opens (see capture)

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError("PollPolicy.batch must be at least 1")
        # A call starts with at least half the lease left; it must end, and its answer be captured, within it.
        if not timedelta(0) < self.call_timeout < self.lease / 2:
            raise ValueError("PollPolicy.call_timeout must be positive and less than half the lease")


async def poll_once(pool: asyncpg.Pool, provider: Provider, policy: PollPolicy) -> tuple[int, int]:
    """One pass: claim due codes, then per call ask, capture and release. Returns (asked, captured).

    A call that fails raises (``ProviderUnavailable`` and its kind) once the pass's codes are released;
    what earlier calls reported is already captured.
    """
    # The lease is set by the database's clock (lease_until names it); when it runs out is judged here by this
    # process's monotonic clock from before the claim was sent, which can only be earlier.
    held_until = clock.monotonic() + policy.lease.total_seconds()
    rows = await pool.fetch(Q.poll_claim, policy.give_up, policy.min_interval, policy.batch, policy.lease)
    if not rows:
        return 0, 0
    lease_until = rows[0]["lease_until"]
    db_clock = DbClock(lease_until - policy.lease)
    queue = [PendingKhqr(md5=r["md5"], bill_number=r["bill_number"], currency=r["currency"], amount=r["amount"],
                         to_account=r["to_account"], expires_at=r["expires_at"]) for r in rows]
    per_call = max(1, provider.poll_batch_size)
    asked = captured = 0
    try:
        while queue:
            if held_until - clock.monotonic() < policy.lease.total_seconds() / 2:
                queue, lease_until, held_until = await _renew(pool, provider.name, queue, lease_until, policy.lease)
                db_clock = DbClock(lease_until - policy.lease)
                if not queue:
                    break
            call, queue = queue[:per_call], queue[per_call:]
            captured += await _ask(pool, provider, call, lease_until, policy, db_clock)
            asked += len(call)
    finally:
        if queue:  # a call failed (or the task was cancelled): free the codes not asked, keeping their turn
            await pool.execute(Q.poll_release, [p.md5 for p in queue], False, lease_until, None, [])
    return asked, captured


class DbClock:
    """The database's time, estimated from one it gave (``now()`` of the claim or renewal, the statement's start)
    plus the time this process measured since that answer arrived: never later than the database's clock, so
    nothing is judged done early. It costs no round trip."""

    def __init__(self, at: datetime) -> None:
        self.at, self.mono = at, clock.monotonic()

    def now(self) -> datetime:
        return self.at + timedelta(seconds=clock.monotonic() - self.mono)


async def _ask(pool: asyncpg.Pool, provider: Provider, call: list[PendingKhqr], lease_until: datetime,
               policy: PollPolicy, db_clock: DbClock) -> int:
    """One provider call: ask, capture what it reported, release its codes. Returns the payments created.

    Codes whose grace was over when the answer was read are done (no longer pending), except those an item of
    the answer could not be read about; when the call fails, none is done."""
    done_before: datetime | None = None
    unreadable: list[str] = []
    try:
        deadline = policy.call_timeout.total_seconds()
        # Bakong's answer says how things stood at some moment of the call: counted from when it was asked, so
        # a slow call does not shorten the grace (found by review); by the database's clock (no later than it),
        # as the codes' expiries are judged by it (found by review: an instance whose clock ran an hour ahead
        # marked codes still payable as answered for good).
        asked_at = db_clock.now()
        try:
            async with asyncio.timeout(deadline):  # not wait_for: on 3.11 it can swallow a cancellation
                result = await provider.poll(call)
        except TimeoutError:
            raise ProviderUnavailable(f"no answer to one poll call within {deadline:g} s (the poller's "
                                      "deadline, so that the codes' lease outlasts the call)",
                                      provider=provider.name) from None
        _report_unreadable(provider.name, result.unreadable)
        # Received now, by the database's clock: a payment time Bakong reports is judged against it (found by
        # review: an instance whose clock ran minutes behind held every polled payment as paid_at_implausible).
        # checked as a callback's are: a pass a plugin answers wrongly fails, and its codes are asked again
        results = await capture_notices(pool, checked_notices(provider.name, result.notices), source="poll",
                                        received_at=db_clock.now(),
                                        business_cutoff=policy.business_cutoff)
        LAST_SUCCESS.labels(provider.name).set(clock.time())  # read and captured (found by review: not before)
        unreadable = [item.md5 for item in result.unreadable if item.md5]
        asked = {p.md5 for p in call}
        if all(md5 in asked for md5 in (item.md5 for item in result.unreadable)):
            done_before = asked_at - policy.grace
        # else an item of the answer names no code of this call (no md5, or one not asked): it may be about any of
        # them, paid, so none is done (found by review: such an item's code was cleared with the rest)
    finally:
        # Asked, or tried to: these codes are due again after min_interval (where the lease is still ours).
        await pool.execute(Q.poll_release, [p.md5 for p in call], True, lease_until, done_before, unreadable)
    return sum(r.created for r in results)


async def _renew(pool: asyncpg.Pool, provider: str, queue: list[PendingKhqr], lease_until: datetime,
                 lease: timedelta) -> tuple[list[PendingKhqr], datetime, float]:
    """Extend the lease of the codes the pass still holds; drop any whose lease is no longer ours. Returns the
    codes kept, the new lease's name, and when it runs out by the monotonic clock."""
    held_until = clock.monotonic() + lease.total_seconds()
    rows = await pool.fetch(Q.poll_renew, [p.md5 for p in queue], lease_until, lease)
    kept = {r["md5"] for r in rows}
    if len(kept) < len(queue):
        log.warning("%s poll: %d of %d claimed codes are no longer leased to this pass; not asking about them",
                    provider, len(queue) - len(kept), len(queue))
    return [p for p in queue if p.md5 in kept], (rows[0]["lease_until"] if rows else lease_until), held_until


def _report_unreadable(provider: str, items: Sequence[UnreadableItem]) -> None:
    for item in items:
        UNREADABLE.labels(provider, "yes" if item.paid else "no").inc()
        log.error("%s: skipped an answer item for md5 %s%s: %s", provider, item.md5 or "(none)",
                  " that says it was paid (money moved that this poll cannot book; the code stays open and is "
                  "asked again)" if item.paid else "", item.reason,
                  extra={"provider": provider, "md5": item.md5, "paid": item.paid,
                         "transaction_id": item.transaction_id})


class Poller:
    """The background loop for one pull provider, with backoff on 429 and 5xx."""

    def __init__(self, pool: asyncpg.Pool, provider: Provider, policy: PollPolicy, interval: float, *,
                 cipher: PiiCipher | None = None) -> None:
        self.pool, self.provider, self.policy, self.interval = pool, provider, policy, interval
        self.cipher = cipher  # encrypts a renewed token stored for every instance; None: tokens are not renewed
        self._failures = 0

    async def run(self) -> None:
        while True:
            stop_if_cancelled()
            delay = self.interval
            try:
                asked, captured = await self.poll_until_drained()
                LAST_SUCCESS.labels(self.provider.name).set(clock.time())  # idle counts: nothing was due
                self._failures = 0
                if captured:
                    log.info("%s poll: %d captured", self.provider.name, captured)
            except TokenRefused as exc:
                # Labelled as any refusal of our credentials, as before renewal existed (found by review: alerts
                # on error="ProviderAuthError" would have stopped firing).
                FAILURES.labels(self.provider.name, "ProviderAuthError").inc()
                self._failures += 1
                delay = backoff(self.interval, self._failures, 300)
                if await self.recover_token():
                    delay = self.interval
                    log.warning("%s refused its token (%s); polling again with another in %.0fs",
                                self.provider.name, exc, delay)
                else:
                    log.error("%s refused its token (%s); next poll in %.0fs", self.provider.name, exc, delay)
            except ProviderUnavailable as exc:
                FAILURES.labels(self.provider.name, type(exc).__name__).inc()
                self._failures += 1
                delay = exc.retry_after or backoff(self.interval, self._failures, 300)
                log.warning("%s unavailable (%s); next poll in %.0fs", self.provider.name, exc, delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                FAILURES.labels(self.provider.name, type(exc).__name__).inc()
                self._failures += 1
                delay = backoff(self.interval, self._failures, 300)
                log.exception("%s poll failed; next poll in %.0fs", self.provider.name, delay)
            await pause(delay)

    async def recover_token(self) -> bool:
        """After the provider refused its token: another one to try (see paysvc.provider_tokens)? Logs why not;
        never raises (found by review: a lost database connection during a renewal ended the poller's task)."""
        if self.cipher is None or not hasattr(self.provider, "use_token"):
            return False
        name = self.provider.name
        try:
            outcome = await provider_tokens.recover(self.pool, self.cipher, self.provider)
        except asyncio.CancelledError:
            raise
        except ProviderError as exc:
            RENEWALS.labels(name, "refused" if isinstance(exc, ProviderAuthError) else "failed").inc()
            log.error("%s: renewing the refused token failed (%s: %s)", name, type(exc).__name__, exc)
            return False
        except Exception as exc:
            log.exception("%s: could not look for another token (%s: %s)", name, type(exc).__name__, exc)
            return False
        if outcome != "unsupported":
            RENEWALS.labels(name, outcome).inc()
        return outcome in ("renewed", "shared")

    async def poll_until_drained(self) -> tuple[int, int]:
        asked = captured = 0
        while True:
            stop_if_cancelled()
            a, c = await poll_once(self.pool, self.provider, self.policy)
            asked, captured = asked + a, captured + c
            if a < self.policy.batch:
                return asked, captured
