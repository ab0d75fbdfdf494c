"""Database connection: a configured PostgreSQL, or an embedded one in the data folder."""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import asynccontextmanager
from typing import AsyncIterator

import asyncpg

from paysvc.settings import Settings

log = logging.getLogger(__name__)


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class EmbeddedPostgres:
    """The ``pgserver`` wheel's PostgreSQL, kept in ``<data_dir>/pg``; stopped by ``close``."""

    def __init__(self, data_dir) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # Without XDG_RUNTIME_DIR (a root shell, a container) platformdirs warns that it uses /tmp/runtime-<uid>
            # for pgserver's lock files: expected there, and not the user's to act on.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            import pgserver  # imported here: only the no-configuration path needs it

            self._server = pgserver.get_server(str((data_dir / "pg").resolve()), cleanup_mode="stop")
        self._forget_dead_handles()
        self.uri = self._server.get_uri()
        log.info("embedded PostgreSQL running", extra={"data_dir": str(data_dir / "pg")})

    def _forget_dead_handles(self) -> None:
        """pgserver stops the database when the last process using it closes, counting the processes in a list
        kept with the data; one that was killed stays listed, and then no later process ever stops it (found by
        an operator's walk-through: after a SIGKILL the database outlived every later clean stop). Processes
        no longer alive are dropped from that list (pgserver's own, read under its lock)."""
        import psutil

        try:
            handles, lock = self._server.global_process_id_list, self._server._lock
        except AttributeError:  # another pgserver version: leave its bookkeeping alone
            return
        with lock:
            listed = handles.get()
            alive = [pid for pid in listed if psutil.pid_exists(pid)]
            if alive != listed:
                handles.put(alive)

    def close(self) -> None:
        self._server.cleanup()


def database_dsn(settings: Settings) -> str | None:
    return settings.database_url.get_secret_value() if settings.database_url else None


class PoolConnection(asyncpg.Connection):
    """A pooled connection released without asyncpg's reset query.

    By default asyncpg sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release: one more round trip per request (measured: ~6% of a service process's time under the payments
    benchmark). The service keeps no session state on pooled connections, only transaction-scoped state
    (``SET LOCAL``, ``pg_try_advisory_xact_lock``, cursors inside a transaction), which ends with the
    transaction; asyncpg still rolls back a transaction left open before the connection is reused.
    """

    def get_reset_query(self) -> str:
        return ""


def rows_affected(status: str) -> int:
    """How many rows a statement changed, from its command tag ('DELETE 12', 'UPDATE 3')."""
    return int(status.split()[-1])


async def execute_in_batches(pool: asyncpg.Pool, query: str, *args, batch: int) -> int:
    """Run ``query`` (whose last parameter is its batch size) until it changes fewer than ``batch`` rows, each run in
    a transaction of its own; return how many it changed in all (pruning and sweeps that must not hold locks long)."""
    total = 0
    while True:
        n = rows_affected(await pool.execute(query, *args, batch))
        total += n
        if n < batch:
            return total


class PoolFloorRetriesAsOneLine(logging.Filter):
    """asyncpg 0.32 keeps a pool at its ``min_size`` by reconnecting in the background, and logs each failed
    reconnect as a WARNING with a full traceback: during a database outage that is a traceback at 1, 2, 4… up to
    every 60 s, beside the one line the service already logs per refused request (found when CI picked up 0.32
    and the outage test saw the traceback). Such a record becomes one line naming the error and what asyncpg
    does next; every other record of asyncpg's passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and str(record.msg).startswith("Failed to restore the pool connection floor"):
            record.msg = ("database connections below the pool's floor (PAYSVC_DB_POOL_MIN) and reconnecting "
                          "failed: %s: %s; retrying with back-off up to 60 s")
            record.args = (type(exc).__name__, exc)
            record.exc_info = record.exc_text = None
        return True


_POOL_FLOOR_FILTER = PoolFloorRetriesAsOneLine()


async def create_pool(dsn: str, settings: Settings) -> asyncpg.Pool:
    pool_log = logging.getLogger("asyncpg.pool")
    if _POOL_FLOOR_FILTER not in pool_log.filters:
        pool_log.addFilter(_POOL_FLOOR_FILTER)
    return await asyncpg.create_pool(
        dsn,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        init=init_connection,
        connection_class=PoolConnection,
        # PgBouncer-friendly and avoids surprises when migrations change types underneath us.
        statement_cache_size=256,
    )


@asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    try:
        yield conn
    finally:
        await conn.close()
