"""When the database cannot be used, requests are answered 503 with Retry-After (never a 500 and a stack trace),
and the service recovers by itself once it can be used again."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from paysvc.web import database_gone, looks_like_misuse
from tests.conftest import ADMIN_DSN


async def _refuse_connections(dbname: str, refuse: bool) -> None:
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS {"false" if refuse else "true"}')
        if refuse:  # and end the service's connections, as an operator or a failover would
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = $1 AND pid <> pg_backend_pid()", dbname)
    finally:
        await admin.close()


async def test_a_database_that_stopped_accepting_connections_is_a_503_then_recovers(api, portal, invoice_body,
                                                                                   caplog):
    """Found by an operator's walk-through: every create was answered 500 (ObjectNotInPrerequisiteStateError)."""
    dbname = api.dsn.rsplit("/", 1)[1].split("?")[0]
    assert (await api.client.post("/v1/invoices", json=invoice_body(), headers=portal)).status == 201
    await _refuse_connections(dbname, True)
    try:
        with caplog.at_level(logging.ERROR):
            for _ in range(3):  # new connections refused (the pooled ones were ended)
                r = await api.client.post("/v1/invoices", json=invoice_body(), headers=portal)
                doc = await r.json()
                assert r.status == 503, doc
                assert doc["type"] == "urn:paysvc:problem:unavailable" and r.headers["Retry-After"] == "5"
                assert "retry later" in doc["detail"] and "Traceback" not in doc["detail"]
        assert not [rec for rec in caplog.records if rec.exc_info], "logged with a stack trace"
        with caplog.at_level(logging.WARNING, logger="paysvc.app"):
            r = await api.client.get("/readyz")
        # Why, in the log; not in the answer, which anyone may ask for (it would name the database and its user)
        assert r.status == 503 and dbname not in await r.text()
        assert any("not ready: the database is unreachable" in m and "accepting connections" in m
                   for m in [rec.getMessage() for rec in caplog.records]), caplog.text
    finally:
        await _refuse_connections(dbname, False)
    r = await api.client.post("/v1/invoices", json=invoice_body(), headers=portal)
    assert r.status == 201, await r.text()


@pytest.mark.parametrize("exc, gone", [
    (asyncpg.ObjectNotInPrerequisiteStateError('database "x" is not currently accepting connections'), True),
    (asyncpg.ObjectNotInPrerequisiteStateError("currval of sequence is not yet defined in this session"), False),
    (asyncpg.LockNotAvailableError("could not obtain lock on row"), False),
    (asyncpg.InterfaceError("cannot perform operation: connection is closed"), True),
    (asyncpg.InterfaceError("cannot perform operation: another operation is in progress"), False),
    (asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"), True),
    (asyncpg.UniqueViolationError("duplicate key"), False),
])
def test_only_errors_that_say_the_database_is_gone_are_taken_for_an_outage(exc, gone):
    assert database_gone(exc) is gone


@pytest.mark.parametrize("message, misuse", [
    ("cannot switch to state 12; another operation (2) is in progress", False),   # the server's error being read
    ("cannot switch to state 15; another operation (4) is in progress", False),   # the connection terminating
    ("cannot switch to state 12; another operation (11) is in progress", True),   # two statements at once: a bug
    ("cannot switch to state 12; another operation (12) is in progress", True),
])
def test_a_connection_the_server_ended_is_logged_without_a_stack_trace(message, misuse):
    """Found when CI met it: a pooled connection the server ended while idle failed its next statement with
    InternalClientError (state 2), which was logged with a stack trace, as a misuse of a connection would be."""
    assert database_gone(asyncpg.InternalClientError(message))
    assert looks_like_misuse(asyncpg.InternalClientError(message)) is misuse
    assert not looks_like_misuse(asyncpg.ObjectNotInPrerequisiteStateError("not accepting connections"))


async def test_the_pools_reconnect_retries_are_one_line_each(api, caplog):
    """asyncpg 0.32 reconnects a pool below its floor in the background and logs each failure with a traceback;
    a pool of the service's logs it as one line naming the error (the record asyncpg writes, as it writes it)."""
    gone = asyncpg.ObjectNotInPrerequisiteStateError('database "x" is not currently accepting connections')
    with caplog.at_level(logging.WARNING, logger="asyncpg.pool"):
        try:
            raise gone
        except asyncpg.PostgresError:
            logging.getLogger("asyncpg.pool").warning("Failed to restore the pool connection floor; retrying",
                                                      exc_info=True)
        logging.getLogger("asyncpg.pool").warning("another warning of asyncpg's, %s", "kept", exc_info=gone)
    floor, other = [r for r in caplog.records if r.name == "asyncpg.pool"]
    assert floor.exc_info is None and floor.levelno == logging.WARNING
    assert floor.getMessage() == ("database connections below the pool's floor (PAYSVC_DB_POOL_MIN) and reconnecting "
                                  'failed: ObjectNotInPrerequisiteStateError: database "x" is not currently '
                                  "accepting connections; retrying with back-off up to 60 s")
    assert other.exc_info and other.getMessage() == "another warning of asyncpg's, kept"
