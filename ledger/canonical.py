"""The canonical bytes of an entry and the hashes built on them (documented in docs/ledger.md).

Content: ``b"paysvc.ledger.entry.v1\\n"`` followed by the JSON object below, serialised with sorted keys, no
whitespace, UTF-8, non-ASCII unescaped (RFC 8785 canonical JSON for this subset: strings, integers, null).
The effective time is an integer count of microseconds since 1970-01-01T00:00:00Z.

Chain: ``chain_hash = SHA-256(prev_hash ‖ position ‖ entry_id ‖ content_hash)`` with position and entry id as
8-byte big-endian unsigned integers; the first seal's ``prev_hash`` is 32 zero bytes.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Iterable, Protocol

CONTENT_PREFIX = b"paysvc.ledger.entry.v1\n"
GENESIS = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class _PostingLike(Protocol):
    account: str
    side: str
    amount: int
    currency: str


def _micros(t: datetime) -> int:
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def canonical_content(
    *, kind: str, description: str, effective_at: datetime, postings: Iterable[_PostingLike],
    idempotency_key: str | None, invoice_id: str | None, payment_id: str | None, settlement_id: str | None,
    reverses: int | None,
) -> bytes:
    """The canonical byte string of an entry's content (postings in line order).

    Written out key by key in sorted order; the bytes are exactly those of ``reference_canonical_content``
    (``json.dumps`` with sorted keys), which a property test checks, at a third of its cost.
    """
    s, n = _str, _opt
    lines = ",".join(f'{{"account":{s(p.account)},"amount":{int(p.amount)},"currency":{s(p.currency)},'
                     f'"side":{s(p.side)}}}' for p in postings)
    doc = (f'{{"description":{s(description)},"effective_at_us":{_micros(effective_at)},'
           f'"idempotency_key":{n(idempotency_key)},"invoice_id":{n(invoice_id)},"kind":{s(kind)},'
           f'"payment_id":{n(payment_id)},"postings":[{lines}],'
           f'"reverses":{"null" if reverses is None else int(reverses)},"settlement_id":{n(settlement_id)}}}')
    return CONTENT_PREFIX + doc.encode()


_str = json.JSONEncoder(ensure_ascii=False).encode  # one JSON string, as json.dumps writes it


def _opt(v: str | None) -> str:
    return "null" if v is None else _str(v)


def reference_canonical_content(
    *, kind: str, description: str, effective_at: datetime, postings: Iterable[_PostingLike],
    idempotency_key: str | None, invoice_id: str | None, payment_id: str | None, settlement_id: str | None,
    reverses: int | None,
) -> bytes:
    """The definition of the canonical content: the JSON document below with sorted keys, no whitespace."""
    doc: dict[str, Any] = {
        "kind": kind,
        "description": description,
        "effective_at_us": _micros(effective_at),
        "idempotency_key": idempotency_key,
        "invoice_id": invoice_id,
        "payment_id": payment_id,
        "settlement_id": settlement_id,
        "reverses": reverses,
        "postings": [{"account": p.account, "side": p.side, "amount": p.amount, "currency": p.currency}
                     for p in postings],
    }
    return CONTENT_PREFIX + json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_hash(entry: Any) -> bytes:
    """SHA-256 of ``canonical_content`` of an ``EntryDraft`` or ``PostedEntry``-like object."""
    return hashlib.sha256(canonical_content(
        kind=entry.kind, description=entry.description, effective_at=entry.effective_at, postings=entry.postings,
        idempotency_key=entry.idempotency_key, invoice_id=entry.invoice_id, payment_id=entry.payment_id,
        settlement_id=entry.settlement_id, reverses=entry.reverses,
    )).digest()


def chain_hash(prev_hash: bytes, position: int, entry_id: int, content: bytes) -> bytes:
    """The seal of ``entry_id`` at ``position``, chained to the previous seal's hash."""
    return hashlib.sha256(prev_hash + position.to_bytes(8, "big") + entry_id.to_bytes(8, "big") + content).digest()
