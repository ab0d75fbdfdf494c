"""Test fixtures: a real PostgreSQL, one fresh database per test cloned from a migrated template."""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from paysvc.app import create_app
from paysvc.auth import create_key
from paysvc.db import connect
from paysvc.migrate import migrate
from paysvc.settings import Settings

ADMIN_DSN = os.environ.get("PAYSVC_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_PII_KEYS = "t1:" + base64.b64encode(b"k" * 32).decode()
TEST_SANDBOX_SECRET = "sandbox-test-secret"


def dsn_for(dbname: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{dbname}"


@pytest_asyncio.fixture(scope="session")
async def template_db():
    """A database migrated once per session; each test gets a copy."""
    name = f"paysvc_tmpl_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        async with connect(dsn_for(name)) as conn:
            await migrate(conn)
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _no_double_encoded_json(dsn: str) -> None:
    """Every JSON value the service stores is an object or an array, never a string holding one: a body
    passed already encoded through the connection's JSON codec is encoded twice (it happened once, to the
    capture's events). Checked after every test, over every json/jsonb column."""
    conn = await asyncpg.connect(dsn)
    try:
        cols = await conn.fetch("SELECT table_name, column_name FROM information_schema.columns "
                                "WHERE table_schema = 'public' AND data_type IN ('json', 'jsonb') "
                                "AND table_name IN (SELECT table_name FROM information_schema.tables "
                                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE')")
        for c in cols:
            bad = await conn.fetchval(
                f'SELECT left("{c["column_name"]}"::text, 200) FROM "{c["table_name"]}" '
                f'WHERE jsonb_typeof("{c["column_name"]}"::jsonb) = \'string\' LIMIT 1')
            assert bad is None, f"{c['table_name']}.{c['column_name']} holds a JSON string, not an object: {bad}"
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def db_dsn(template_db):
    name = f"paysvc_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        yield dsn_for(name)
        await _no_double_encoded_json(dsn_for(name))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest_asyncio.fixture
async def db(db_dsn):
    async with connect(db_dsn) as conn:
        yield conn


def make_settings(dsn: str, **overrides) -> Settings:
    values = dict(database_url=dsn, pii_keys=TEST_PII_KEYS, public_url="http://paysvc.test", db_pool_min=1,
                  sandbox_secret=TEST_SANDBOX_SECRET,
                  db_pool_max=30)
    values.update(overrides)
    return Settings(**values)


@dataclass
class Api:
    """A running service under test, with helpers to make agencies and keys."""

    client: TestClient
    dsn: str

    async def agency(self, code: str = "MOI", **kw) -> str:
        from paysvc.agencies import add_agency

        fields = dict(code=code, name=f"{code} Fees Office", name_km="ក្រសួងមហាផ្ទៃ",
                      bakong_account=f"{code.lower()}@nbcq", merchant_id=None, acquiring_bank=None,
                      mcc="9399", city="Phnom Penh")
        fields.update(kw)
        async with connect(self.dsn) as conn:
            await add_agency(conn, **fields)
        return code

    async def key(self, agency: str | None = "MOI", scopes=("invoices:write", "invoices:read"), name="test key") -> str:
        async with connect(self.dsn) as conn:
            _, full = await create_key(conn, name=name, scopes=list(scopes), agency_code=agency)
        return full

    async def portal(self, code: str = "MOI", **kw) -> dict[str, str]:
        """An agency and the Authorization header of its portal key."""
        await self.agency(code, **kw)
        return {"Authorization": f"Bearer {await self.key(code)}"}


@contextlib.asynccontextmanager
async def running_api(dsn: str, *, background: bool = False, **overrides) -> AsyncIterator[Api]:
    """The service on a local port, with settings changed by ``overrides`` (background jobs, such as the relay,
    off unless ``background``)."""
    app = create_app(make_settings(dsn, **overrides), dsn, background=background)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Api(client, dsn)
    finally:
        await client.close()


@pytest_asyncio.fixture
async def api(db_dsn):
    async with running_api(db_dsn) as a:
        yield a


@pytest_asyncio.fixture
async def portal(api):
    """Authorization headers of agency MOI's portal key."""
    return await api.portal("MOI")


@pytest_asyncio.fixture
async def treasury(api):
    """Authorization headers of a treasury key."""
    return {"Authorization": f"Bearer {await api.key(None, scopes=['treasury'], name='Treasury desk')}"}


@pytest.fixture
def invoice_body():
    def make(**kw):
        body = {"reference": f"REF-{uuid.uuid4().hex[:8]}", "description": "Passport fee", "currency": "KHR",
                "amount": 50000}
        body.update(kw)
        return body
    return make
