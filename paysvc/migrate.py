"""Apply ``migrations/NNNN_name.sql`` in order, each in its own transaction.

Each applied file is recorded with its SHA-256 in ``schema_migrations``; an applied file that has
changed since stops the run. A session advisory lock makes concurrent runs wait for each other.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_LOCK_KEY = 0x70617973  # "pays": one well-known advisory lock for the migration runner
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """The source tree's ``migrations/`` when run from a checkout, else the copy installed with the package."""
    here = Path(__file__).resolve().parent.parent / "migrations"
    if here.is_dir():
        return here
    return Path(str(importlib.resources.files("paysvc") / "migrations"))


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files must be named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    if not found:
        raise MigrationError(f"no migration files found in {directory}; set PAYSVC_MIGRATIONS_DIR to the migrations/ folder")
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; return the names applied. Safe to run concurrently.

    A database already up to date is only read (no lock, nothing created), so the service starts as a member
    of paysvc_app, which may not change the schema; one that needs migrating, as such a role, is refused
    saying to run ``paysvc migrate`` as the owner (found by an operator's walk-through: the service could not
    start at all as the role the documentation prescribes)."""
    migrations = load_migrations(directory)
    if await _up_to_date(conn, migrations):
        return []
    try:
        return await _apply(conn, migrations)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise MigrationError(f"the database needs migrating and this role may not change its schema ({exc}): run "
                             "`paysvc migrate` as the database's owner, then start again") from None


async def up_to_date(conn: asyncpg.Connection, directory: Path | None = None) -> bool:
    """Whether every migration of this version is applied, and no other, reading the history only (no lock,
    nothing created). A changed file or an unknown version raises ``MigrationError``, as ``migrate`` does."""
    return await _up_to_date(conn, load_migrations(directory))


async def _up_to_date(conn: asyncpg.Connection, migrations: list[Migration]) -> bool:
    """Whether every migration is applied, as it is now, and no other: read without a lock."""
    applied = await _history(conn, migrations)
    return applied is not None and set(applied) == {m.version for m in migrations}


async def _history(conn: asyncpg.Connection, migrations: list[Migration]) -> dict | None:
    """The migrations applied, by version, once checked against ``migrations`` (see _check_history); None when
    there is no history yet, or this role may not read it (before migration 0042)."""
    if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return None
    try:
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
    except asyncpg.InsufficientPrivilegeError:
        return None  # the locked path says what to do
    applied = {r["version"]: r for r in rows}
    _check_history(applied, migrations)
    return applied


def _check_history(applied: dict, migrations: list[Migration]) -> None:
    """Refuse a history this code cannot continue: an applied file changed since, or versions it does not know
    (raised as such for any role; found by review: the service role was told to migrate, which cannot help)."""
    for mig in migrations:
        row = applied.get(mig.version)
        if row is not None and row["checksum"] != mig.checksum:
            raise MigrationError(
                f"migration {mig.version:04d}_{mig.name}.sql was changed after it was applied "
                f"(recorded checksum {row['checksum'][:12]}…, file now {mig.checksum[:12]}…); "
                "restore the file and add a new migration instead"
            )
    unknown = sorted(set(applied) - {m.version for m in migrations})
    if unknown:
        raise MigrationError(f"database has migrations this code does not know: {unknown}; upgrade paysvc")


async def _apply(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        applied = await _history(conn, migrations)
        if applied is None:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            applied = {  # raises for a role that may not read it
                r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
            }
            _check_history(applied, migrations)
        # every migration applied already (by another, while this one waited for the lock): nothing is done
        for mig in migrations:
            if mig.version in applied:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    mig.version, mig.name, mig.checksum,
                )
            applied_now.append(f"{mig.version:04d}_{mig.name}")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
