"""PostgreSQL's own table counters, for tests that count what a statement read or wrote instead of timing it."""

from __future__ import annotations

import asyncpg


async def table_counter(conn: asyncpg.Connection, counter: str, *tables: str) -> int:
    """``counter`` (an expression over the columns of ``pg_stat_user_tables``, e.g. ``n_tup_ins``) summed over
    ``tables``, as of now: this connection's own counters are flushed first (a backend sends them when it goes
    idle), and the view is read afresh, not from a snapshot cached earlier in the session. Another connection's
    counters reach the view once it has gone idle after ``SELECT pg_stat_force_next_flush()``."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await conn.fetchval(f"SELECT coalesce(sum({counter}), 0)::bigint FROM pg_stat_user_tables "
                               "WHERE relname = ANY($1::text[])", list(tables))
