"""Verification: recompute every entry's content hash, the hash chain and every balance from the postings."""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from datetime import datetime
from typing import Iterable

import asyncpg
from pydantic import BaseModel, ConfigDict, computed_field

from ledger.accounts import account_spec
from ledger.canonical import GENESIS, chain_hash, content_hash
from ledger.errors import LedgerError
from ledger.postings import Posting
from ledger.sql import Q

_PAGE = 2000


class EntryProblem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    entry_id: int
    seal_position: int | None
    problem: str


class BalanceMismatch(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    account: str
    maintained_debits: int
    maintained_credits: int
    maintained_postings: int
    posted_debits: int
    posted_credits: int
    posted_postings: int


class AccountProblem(BaseModel):
    """An account row that no longer says what its code says (type, currency, normal side)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    account: str
    problem: str


class ChainHead(BaseModel):
    """A seal of the hash chain: its position, its chain hash (hex) and the entry it seals. The chain hash at a
    position commits to every entry sealed up to it, so a copy kept outside the database (an anchor) lets a
    later ``verify`` prove that none of them was changed, deleted or re-chained since."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    position: int
    chain_hash: str
    entry_id: int
    sealed_at: datetime | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def anchor(self) -> str:
        """``POSITION:HASH``, the form ``verify`` and ``paysvc ledger verify --anchor`` take back."""
        return f"{self.position}:{self.chain_hash}"


class AnchorProblem(BaseModel):
    """A recorded anchor the chain no longer holds: the seal at its position has another hash, or is gone."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    position: int
    recorded_hash: str
    found_hash: str | None
    problem: str


class VerifyReport(BaseModel):
    """What ``verify`` found. ``first_bad_entry`` is the first entry, in chain order, where anything differs.
    ``head`` is the last seal walked (None when nothing is sealed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    entries: int
    sealed: int
    unsealed: int
    first_bad_entry: int | None
    entry_problems: list[EntryProblem]
    balance_mismatches: list[BalanceMismatch]
    head: ChainHead | None = None
    anchor_problems: list[AnchorProblem] = []
    account_problems: list[AccountProblem] = []

    @property
    def ok(self) -> bool:
        return (not self.entry_problems and not self.balance_mismatches and not self.anchor_problems
                and not self.account_problems)


def parse_anchor(text: str) -> tuple[int, str]:
    """``POSITION:HASH`` (as ``ChainHead.anchor`` gives it) as (position, lower-case hex hash); ValueError
    saying what is wrong otherwise."""
    position, sep, digest = text.strip().partition(":")
    if (not sep or not position.isascii() or not position.isdigit() or len(position) > 19
            or not 1 <= int(position) < 2**63):
        raise ValueError(f"anchor {text[:100]!r}: expected POSITION:HASH, a seal position (1 or more), a colon and "
                         "the 64 hex digits of its chain hash, as `paysvc ledger verify` prints them")
    digest = digest.strip().lower()
    if len(digest) != 64:
        raise ValueError(f"anchor {text[:100]!r}: the hash must be 64 hex digits (a SHA-256), got {len(digest)} "
                         "characters")
    if any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"anchor {text[:100]!r}: the hash may hold only the hex digits 0-9 and a-f")
    return int(position), digest


async def chain_head(conn: asyncpg.Connection, position: int | None = None) -> ChainHead | None:
    """The seal at ``position``, or the last seal when None; None when there is no such seal. Read as stored:
    ``verify`` is what proves the chain up to it."""
    r = await conn.fetchrow(Q.seal_at, position)
    if r is None:
        return None
    return ChainHead(position=r["position"], chain_hash=bytes(r["chain_hash"]).hex(), entry_id=r["entry_id"],
                     sealed_at=r["sealed_at"])


class _Entry:  # the shape content_hash reads
    def __init__(self, r: asyncpg.Record, postings: list[Posting]) -> None:
        self.kind, self.description, self.effective_at = r["kind"], r["description"], r["effective_at"]
        self.idempotency_key, self.invoice_id = r["idempotency_key"], r["invoice_id"]
        self.payment_id, self.settlement_id, self.reverses = r["payment_id"], r["settlement_id"], r["reverses"]
        self.postings = postings


async def _postings(conn: asyncpg.Connection, ids: list[int]) -> tuple[dict[int, list[Posting]], dict[int, list[str]]]:
    """Each entry's postings, and per entry the problems of postings whose account row is missing."""
    out: dict[int, list[Posting]] = defaultdict(list)
    lost: dict[int, list[str]] = defaultdict(list)
    for p in await conn.fetch(Q.verify_postings, ids):
        if p["account"] is None:
            lost[p["entry_id"]].append(f"posting line {p['line']} names account {p['account_id']}, which is missing "
                                       "(the account row was deleted, or the posting written behind the ledger's back)")
        # model_construct: a tampered row must be reported, not rejected by validation
        out[p["entry_id"]].append(Posting.model_construct(
            account=p["account"] if p["account"] is not None else f"#{p['account_id']}", side=p["side"],
            amount=p["amount"], currency=p["currency"]))
    return out, lost


def _check(r: asyncpg.Record, postings: list[Posting]) -> tuple[list[str], bytes]:
    """The entry's problems, and its content hash recomputed from what is stored."""
    found = []
    actual = content_hash(_Entry(r, postings))
    if actual != bytes(r["content_hash"]):
        found.append("content differs from its recorded hash (entry or postings changed)")
    net: dict[str, int] = defaultdict(int)
    for p in postings:
        net[p.currency] += p.amount if p.side == "debit" else -p.amount
    if len(postings) < 2 or any(net.values()):
        found.append("postings do not balance per currency")
    if r["future_txid"]:
        found.append("its transaction id is one no transaction had when this check began: written behind the "
                     "ledger's back (the sealer would never reach it)")
    return found, actual


def _chain_order(behind: dict[int, tuple[int, int]]):
    """Problems in chain order: by seal position; an unsealed entry the sealer passed at the position after the
    last seal before it, ahead of that position's own problems (found by review: after a seal was deleted, the
    next sealed entry was named first, the entry that lost its seal last); other unsealed entries after, by id."""
    def key(p: EntryProblem) -> tuple[int, int, int, int]:
        if p.seal_position is not None:
            return (0, p.seal_position, 0, 0)
        if p.entry_id in behind:
            position, rank = behind[p.entry_id]
            return (0, position, -1, rank)
        return (1, p.entry_id, 0, 0)
    return key


async def verify(conn: asyncpg.Connection, *, anchors: Iterable[tuple[int, str]] = ()) -> VerifyReport:
    """Recompute the chain and every balance; run it in a REPEATABLE READ transaction for one consistent view.

    Checks, in chain order then for unsealed entries: each entry's content hash, that it balances, each
    seal's link to the previous one and its hash; a seal whose entry row is gone; an unsealed entry that
    the sealer has already passed; postings whose entry row is gone; and every account's maintained
    debits, credits and posting count against those of its postings (postings of existing entries only).
    ``first_bad_entry`` is the first problem in chain order (an unsealed entry the sealer passed, just before
    the next sealed entry; then the other unsealed entries, by entry id).

    ``anchors``: (position, hex chain hash) pairs recorded earlier (``parse_anchor``). The chain alone cannot
    show entries deleted from its end, or a chain recomputed after an edit; a copy of a chain hash kept
    elsewhere can: each anchor's seal must still be there with that hash, and the chain recomputed from the
    entries as they are now must reach that hash there. ``head`` in the report is the last seal, as stored.
    """
    expected: dict[int, list[str]] = defaultdict(list)  # every hash recorded for a position is checked
    for position_, digest in anchors:
        digest = digest.hex() if isinstance(digest, bytes) else str(digest).strip().lower()
        if digest not in expected[int(position_)]:
            expected[int(position_)].append(digest)
    anchor_problems: list[AnchorProblem] = []
    rechained: bytes | None = GENESIS  # the chain recomputed from the entries' contents, whatever the seals say
    last_seal: asyncpg.Record | None = None
    problems: list[EntryProblem] = []
    entries = sealed = 0
    prev, position = GENESIS, 0
    last_txid, last_id = "0", 0
    gaps: list[tuple[int, int]] = []  # runs of seal positions missing from the chain (first, last)
    while True:
        rows = await conn.fetch(Q.verify_sealed_page, position, _PAGE)
        if not rows:
            break
        postings, lost = await _postings(conn, [r["id"] for r in rows])
        for r in rows:
            if r["missing"]:  # nothing to recompute: its content hash went with it
                found = [f"seal {r['position']} names entry {r['id']}, which is missing "
                         "(the entry row was deleted)"]
                rechained = None
            else:
                entries += 1
                sealed += 1
                found, actual = _check(r, postings[r["id"]])
                found += lost.get(r["id"], [])
                last_txid, last_id = r["txid"], r["id"]
                if rechained is not None:
                    rechained = chain_hash(rechained, r["position"], r["id"], actual)
            if r["position"] != position + 1:
                found.append(f"seal position {r['position']} follows {position}: the chain has a gap")
                if r["position"] > position + 1:
                    gaps.append((position + 1, r["position"] - 1))
            if bytes(r["prev_hash"]) != prev:
                found.append("seal does not link to the previous seal's hash")
            # The seal's own hash, from the previous hash it names: a broken link is reported above, and the seal
            # after a gap was otherwise reported as forged too.
            if not r["missing"] and bytes(r["chain_hash"]) != chain_hash(
                    bytes(r["prev_hash"]), r["position"], r["id"], bytes(r["content_hash"])):
                found.append("seal hash does not match its position, entry and content hash")
            problems += [EntryProblem(entry_id=r["id"], seal_position=r["position"], problem=f) for f in found]
            prev, position = bytes(r["chain_hash"]), r["position"]
            last_seal = r
            for recorded in expected.pop(position, []):
                # Both the seal as stored and the chain recomputed from the entries as they are now must be
                # what was recorded: a seal kept intact over changed entries is caught here too.
                if recorded != prev.hex():
                    anchor_problems.append(AnchorProblem(
                        position=position, recorded_hash=recorded, found_hash=prev.hex(),
                        problem=f"seal {position} has another chain hash than the one recorded for it: an entry up "
                                "to it was changed or deleted and the chain recomputed, or the record is of "
                                "another ledger"))
                elif rechained is None or rechained.hex() != recorded:
                    anchor_problems.append(AnchorProblem(
                        position=position, recorded_hash=recorded, found_hash=prev.hex(),
                        problem=f"seal {position} still has the recorded hash, but the entries sealed up to it, as "
                                "they are now, chain to another: an entry or posting up to it was changed or "
                                "deleted (see the entry problems)"))
    head = None if last_seal is None else ChainHead(
        position=last_seal["position"], chain_hash=bytes(last_seal["chain_hash"]).hex(), entry_id=last_seal["id"],
        sealed_at=last_seal["sealed_at"])
    after = -2**63  # every id a bigint can hold: an entry written with id 0 or below is walked too
    unsealed = 0
    passed: list[int] = []  # unsealed entries the sealer passed
    while True:
        rows = await conn.fetch(Q.verify_unsealed_page, after, _PAGE, last_txid, last_id)
        if not rows:
            break
        postings, lost = await _postings(conn, [r["id"] for r in rows])
        for r in rows:
            entries += 1
            unsealed += 1
            found, _ = _check(r, postings[r["id"]])
            found += lost.get(r["id"], [])
            if r["behind_seal"]:
                found.append("unsealed, but the sealer has already passed it (chain order broken)")
                passed.append(r["id"])
            problems += [EntryProblem(entry_id=r["id"], seal_position=None, problem=f) for f in found]
            after = r["id"]
    problems += [EntryProblem(entry_id=o["entry_id"], seal_position=o["position"],
                              problem=f"{o['postings']} postings name this entry, which is missing "
                                      "(the entry row was deleted)")
                 for o in await conn.fetch(Q.verify_orphan_postings)]
    # Account rows are in no hash: a currency, type or normal side changed behind the ledger's back would
    # otherwise pass (found by review: the trial balance then no longer balanced per currency, and verify said
    # nothing). Each row is checked against its code, and each posting's currency against its account's.
    problems += [EntryProblem(entry_id=p["entry_id"], seal_position=p["position"],
                              problem=f"posting line {p['line']} is in {p['currency']}, but its account {p['code']} "
                                      f"holds {p['account_currency']}")
                 for p in await conn.fetch(Q.verify_posting_currencies)]
    account_problems = [AccountProblem(account=a["code"], problem=why)
                        for a in await conn.fetch(Q.verify_accounts) if (why := _account_differs(a))]
    # Each passed entry lost its seal: it held the first missing position after the last seal (of an entry
    # still there) before it in chain order (found by review: counting from that seal alone put it after the
    # seal of a deleted entry that came before it).
    behind: dict[int, tuple[int, int]] = {}
    last = 0  # positions held rise along the chain: each entry takes the first free one after the last taken
    for rank, r in enumerate(await conn.fetch(Q.verify_prev_seals, passed) if passed else []):  # in chain order
        held = _held(max(r["prev_seal"] or 0, last), gaps)
        if r["next_seal"] is not None and held >= r["next_seal"]:
            # No free position before the next seal: it never had one (forged behind the sealer's back, say).
            # It sorts just before that seal and takes nothing (found by review: it pushed the entries after it
            # that did lose their seal past real seals).
            behind[r["id"]] = (r["next_seal"], rank)
        else:
            last = held
            behind[r["id"]] = (held, rank)
    problems.sort(key=_chain_order(behind))  # stable: each entry's problems keep their order
    mismatches = [BalanceMismatch(account=m["code"], maintained_debits=m["debits"],
                                  maintained_credits=m["credits"], maintained_postings=m["postings"],
                                  posted_debits=m["sum_debits"], posted_credits=m["sum_credits"],
                                  posted_postings=m["sum_postings"])
                  for m in await conn.fetch(Q.verify_balances)]
    for missing_at, recorded_hashes in sorted(expected.items()):  # positions the walk never met
        if position == 0:
            why = "nothing is sealed"
        elif missing_at < position:
            why = "the chain has no seal there (see the gap reported)"
        else:
            # Found by an auditor's walk-through: said "deleted from its end" of a chain recomputed after a deletion
            # in its middle. Anchors at earlier positions tell which: the first that fails is at or after it.
            why = (f"the chain ends at seal {position}, before it: sealed entries were deleted, from its end or "
                   f"before it with the chain recomputed (the earliest recorded anchor that fails is at or after "
                   f"the first change)")
        for recorded in recorded_hashes:
            anchor_problems.append(AnchorProblem(
                position=missing_at, recorded_hash=recorded, found_hash=None,
                problem=f"no seal {missing_at}, recorded earlier: {why} (or the record is of another ledger)"))
    return VerifyReport(entries=entries, sealed=sealed, unsealed=unsealed,
                        first_bad_entry=problems[0].entry_id if problems else None,
                        entry_problems=problems, balance_mismatches=mismatches, head=head,
                        anchor_problems=anchor_problems, account_problems=account_problems)


def _held(after: int, gaps: list[tuple[int, int]]) -> int:
    """The first seal position missing from the chain after ``after`` (``gaps``: runs of missing positions, in
    order), or ``after + 1`` when none is. The caller passes the last position taken by an entry before in chain
    order when it is later (found by review: two entries that lost their seals could take one position)."""
    i = bisect.bisect_right(gaps, (after, math.inf))  # gaps starting after `after`; the one before may cover it
    if i and gaps[i - 1][1] > after:
        return after + 1
    return gaps[i][0] if i < len(gaps) else after + 1


def _account_differs(a: asyncpg.Record) -> str | None:
    """What an account row says otherwise than its code, or None."""
    try:
        spec = account_spec(a["code"])
    except LedgerError as exc:
        return f"its code is not one the ledger makes ({exc})"
    differs = [f"{field} {a[field]} where its code says {getattr(spec, field)}"
               for field in ("type", "currency", "normal_side") if a[field] != getattr(spec, field)]
    return "; ".join(differs) or None
