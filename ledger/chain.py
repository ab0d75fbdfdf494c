"""The sealer: chains committed entries into the hash chain, in batches, after they commit.

Writers never touch the chain, so they do not queue on one "last hash" row. The sealer orders entries by
(writing transaction id, entry id) and only takes entries whose transaction is older than the oldest
transaction still running (``pg_snapshot_xmin``): once it is past them, no entry can later appear before
them in that order, so the chain never skips an entry that commits late. See docs/ledger.md.
"""

from __future__ import annotations

import asyncpg

from ledger.canonical import GENESIS, chain_hash
from ledger.errors import LedgerTampered
from ledger.sql import Q


async def seal(conn: asyncpg.Connection, *, batch: int = 5000) -> int:
    """Seal up to ``batch`` committed entries in their own transaction; return how many were sealed.

    Safe with several service instances: a transaction-level advisory lock lets one sealer work at a
    time; the others return 0 at once. Raises ``LedgerTampered`` (and seals nothing) when the last seal's
    entry row is gone: the chain cannot be continued from an entry that no longer exists, and going on
    would bury the deletion under new seals.
    """
    async with conn.transaction():
        if not await conn.fetchval(Q.seal_lock):
            return 0
        last = await conn.fetchrow(Q.last_seal)
        if last and last["id"] is None:
            raise LedgerTampered(
                f"seal {last['position']}, the last one, names entry {last['entry_id']}, which is missing: "
                "the entry row was deleted behind the ledger's back; refusing to seal until that is resolved "
                "(paysvc ledger verify lists what differs)")
        position, prev, txid, last_id = (last["position"], bytes(last["chain_hash"]), last["txid"], last["id"]) \
            if last else (0, GENESIS, "0", 0)
        rows = await conn.fetch(Q.sealable, txid, last_id, batch)
        if not rows:
            return 0
        forged = [r["id"] for r in rows if r["id"] < 1]
        if forged:
            # Found by review: an entry with id 0 was sealed, and one with a negative id stopped the sealer with an
            # OverflowError (the chain encodes ids as unsigned 64-bit). Ids come from an identity column from 1.
            raise LedgerTampered(
                f"entry {forged[0]} has an id no entry of the ledger can have (ids start at 1): it was written "
                "behind the ledger's back; refusing to seal until that is resolved (paysvc ledger verify lists "
                "what differs)")
        positions, ids, prevs, hashes = [], [], [], []
        for r in rows:
            position += 1
            h = chain_hash(prev, position, r["id"], bytes(r["content_hash"]))
            positions.append(position)
            ids.append(r["id"])
            prevs.append(prev)
            hashes.append(h)
            prev = h
        await conn.execute(Q.seal_insert, positions, ids, prevs, hashes)
        return len(rows)


async def seal_all(conn: asyncpg.Connection, *, batch: int = 5000) -> int:
    """Seal until nothing sealable is left (or another sealer holds the lock); return how many were sealed."""
    total = 0
    while True:
        n = await seal(conn, batch=batch)
        total += n
        if n < batch:
            return total
