"""API keys: random, shown once, stored as a hash, compared in constant time, revocable.

A key reads ``psk_<id>_<secret>``. The id finds the row; the secret's SHA-256 is compared with
``hmac.compare_digest``. The secret has 256 bits of entropy, so a fast hash is enough (nothing to
brute-force), and lookups stay cheap on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import asyncpg

from paysvc.errors import Forbidden, Unauthenticated, ValidationFailed

SCOPES = ("invoices:write", "invoices:read", "treasury", "admin")
_CACHE_SECONDS = 5.0  # a revoked key stops working within this many seconds on every instance
_UNKNOWN_IDS = 10_000  # ids looked up in vain, remembered for as long


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    scopes: frozenset[str]
    agency_id: int | None
    agency_code: str | None

    @property
    def actor(self) -> str:
        """Who did it, as recorded (resolved_by, imported_by): the key's name and its id, at most 100 characters."""
        return actor(self.name, self.key_id)

    def require(self, scope: str) -> None:
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Forbidden(f"this API key needs the {scope!r} scope", required_scope=scope)

    def require_agency(self) -> int:
        if self.agency_id is None:
            raise Forbidden("this action needs an agency's API key (create one with `paysvc keys create --agency CODE`)")
        return self.agency_id


def actor(name: str, key_id: str) -> str:
    """A key's name with its id ("Treasury desk (key 3f2a9c01b7de)"): names need not be unique (found by an auditor's
    walk-through: two keys named "Treasury desk" resolved exceptions indistinguishably); the id is what
    `paysvc keys list` and `keys revoke` name. Cut to the 100 characters the records hold, the id kept whole."""
    suffix = f" (key {key_id})"
    return name[:100 - len(suffix)] + suffix


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_key() -> tuple[str, str, bytes]:
    """Return (key id, full key to show once, hash to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, f"psk_{key_id}_{secret}", _hash(secret)


async def create_key(
    conn: asyncpg.Connection, *, name: str, scopes: list[str], agency_code: str | None
) -> tuple[str, str]:
    bad = sorted(set(scopes) - set(SCOPES))
    if bad or not scopes:
        raise ValidationFailed(f"unknown scope(s) {bad}; choose from {list(SCOPES)}" if bad else "give at least one --scope")
    agency_id = None
    if agency_code is not None:
        agency_id = await conn.fetchval("SELECT id FROM agencies WHERE code = $1", agency_code)
        if agency_id is None:
            raise ValidationFailed(f"no agency with code {agency_code!r}; add it first with `paysvc agencies add`")
    if any(s.startswith("invoices:") for s in scopes) and agency_id is None:
        raise ValidationFailed("invoices scopes belong to an agency's key: give --agency CODE")
    cross = sorted(s for s in scopes if not s.startswith("invoices:"))
    if cross and agency_id is not None:
        # An agency's key sees only its agency's data; these scopes read or act across every agency.
        raise ValidationFailed(f"scope(s) {cross} read or act across all agencies and cannot be given to an "
                               "agency's key: create a separate key without --agency")
    key_id, full, digest = new_key()
    await conn.execute(
        "INSERT INTO api_keys (id, name, agency_id, scopes, secret_hash) VALUES ($1, $2, $3, $4, $5)",
        key_id, name, agency_id, sorted(set(scopes)), digest,
    )
    return key_id, full


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> bool:
    if key_id.startswith("psk_"):
        key_id = key_id.split("_")[1]
    status = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    return status.endswith(" 1")


class Authenticator:
    """Resolves bearer keys to principals, with a short cache so a hot path costs no query."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # Keys found, and ids looked up in vain, apart: a client sending made-up ids fills only the second, and
        # clearing it when full never sends the real keys' requests back to the database (found by a security
        # review: one cache of both, cleared at 10,000 ids, could be flushed by anyone).
        self._cache: dict[str, tuple[float, bytes, Principal | None]] = {}
        self._unknown: dict[str, float] = {}

    async def authenticate(self, header: str | None) -> Principal:
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":  # RFC 9110: the scheme is case-insensitive
            raise Unauthenticated("send the API key as 'Authorization: Bearer psk_…'")
        token = token.strip()
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != "psk" or not parts[1] or not parts[2]:
            raise Unauthenticated("the API key is malformed: it should look like psk_<id>_<secret>")
        if not (token.isascii() and token.isprintable()):
            # Keys are ASCII: anything else is no key of ours (found by a fuzz audit: bytes that are not UTF-8
            # reached the key lookup and came back as a database error, 400 "out of range", not 401).
            raise Unauthenticated("the API key is malformed: keys are plain ASCII, psk_<id>_<secret>")
        key_id, secret = parts[1], parts[2]
        if len(key_id) > 32:  # ids are 12 characters: a longer one is no key, and is not looked up nor remembered
            raise Unauthenticated("unknown or revoked API key")
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is None and self._unknown.get(key_id, 0.0) >= now:
            cached = (0.0, b"", None)
        elif cached is None or cached[0] < now:
            row = await self._pool.fetchrow(
                """SELECT k.id, k.name, k.scopes, k.secret_hash, k.agency_id, a.code
                     FROM api_keys k LEFT JOIN agencies a ON a.id = k.agency_id
                    WHERE k.id = $1 AND k.revoked_at IS NULL""",
                key_id,
            )
            if row is None:
                cached = (0.0, b"", None)
                self._cache.pop(key_id, None)  # revoked
                if len(self._unknown) >= _UNKNOWN_IDS:
                    self._unknown.clear()
                self._unknown[key_id] = now + _CACHE_SECONDS
            else:
                principal = Principal(row["id"], row["name"], frozenset(row["scopes"]), row["agency_id"], row["code"])
                cached = (now + _CACHE_SECONDS, bytes(row["secret_hash"]), principal)
                self._cache[key_id] = cached  # at most one per key that exists
        _, digest, principal = cached
        # Always compare, even for an unknown id, so timing says nothing about which ids exist.
        ok = hmac.compare_digest(_hash(secret), digest or b"\0" * 32)
        if not ok or principal is None:
            raise Unauthenticated("unknown or revoked API key")
        return principal
