"""The application factory: ``create_app(settings, dsn)`` returns an unstarted aiohttp app.

Every resource (database pool, background tasks) is opened in a cleanup context, so nothing happens
at import or construction time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import timedelta
from typing import AsyncIterator

import asyncpg
import prometheus_client
from aiohttp import web

from paysvc import api_events, api_invoices, api_ledger, api_providers, api_reconciliation, api_refunds, inbox
from paysvc import invoicing, pages
from paysvc import api_settlements, outbox, provider_tokens, settlement_import, treasury_pages
from paysvc.poller import Poller, PollPolicy
from paysvc.provider_settings import provider_config
from providers import ProviderError, UnknownProvider, load_providers
from paysvc.auth import Authenticator
from paysvc.background import run_periodically
from paysvc.backlog import Backlog
from paysvc.db import create_pool
from paysvc.migrate import load_migrations
from paysvc.openapi import build_openapi
from paysvc.pii import check_pii_keys, cipher_from_settings
from paysvc.settings import Settings, SettingsError, unknown_variables
from paysvc.settlement_days import parse_cutoff
from paysvc.web import (
    AUTH, BACKGROUND, POOL, PROVIDERS, ROUTES, SETTINGS, Route, add_routes, admission_middleware, json_response,
    request_middleware,
)

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


SCHEMA_VERSION = web.AppKey("schema_version", int)


_UNREADY_LOGGED: dict[str, float] = {}


def _log_unready(reason: str) -> None:
    """Log why the database is unreachable once a minute per reason (a load balancer asks every few seconds)."""
    now = time.monotonic()
    if now - _UNREADY_LOGGED.get(reason, -60.0) >= 60.0:
        if len(_UNREADY_LOGGED) > 100:
            _UNREADY_LOGGED.clear()
        _UNREADY_LOGGED[reason] = now
        log.warning("not ready: the database is unreachable: %s", reason)


async def readyz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(2):
            version = await request.app[POOL].fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        version = None
    except Exception as exc:  # any failure to answer means not ready
        # The reason is logged (found by an operator's walk-through: the answer gave only the class), not answered:
        # it names the database's host, database and user to whoever asks (found by review).
        _log_unready(f"{type(exc).__name__}: {exc}")
        return json_response({"status": "unavailable", "database": f"unreachable: {type(exc).__name__} (the "
                                                                    "reason is in the service's log)"}, 503)
    expected = request.app[SCHEMA_VERSION]
    if version is not None and version > expected:
        # Found by an operator's walk-through: this said "run paysvc migrate", which then refuses (it knows no
        # migration past its own): it is this instance that is too old.
        return json_response({"status": "unavailable", "database": "ok",
                              "schema": f"at migration {version}, newer than this version knows ({expected}): "
                                        "upgrade paysvc on this instance"}, 503)
    if version != expected:
        # Found by an operator's walk-through: a database dropped and made again empty (or restored from an older
        # dump) answered "ready".
        return json_response({"status": "unavailable", "database": "ok",
                              "schema": f"at migration {version or 'none'}, this version needs {expected}: run "
                                        "`paysvc migrate`"}, 503)
    return json_response({"status": "ready", "database": "ok"})


BACKLOG = web.AppKey("backlog", Backlog)


async def metrics(request: web.Request) -> web.Response:
    await request.app[BACKLOG].refresh(request.app[POOL], request.app[PROVIDERS])
    return web.Response(body=prometheus_client.generate_latest(),
                        headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return json_response(build_openapi(request.app[ROUTES], request.app[SETTINGS].base_url))


OPS_ROUTES = [
    Route("GET", "/healthz", healthz, "Liveness: the process answers", tags=("operations",)),
    Route("GET", "/readyz", readyz, "Readiness: the database answers, migrated as this version needs",
          tags=("operations",)),
    Route("GET", "/metrics", metrics, "Prometheus metrics", content_type="text/plain", tags=("operations",)),
    Route("GET", "/openapi.json", openapi, "This document", tags=("operations",)),
]


def create_app(settings: Settings, dsn: str, *, background: bool = True) -> web.Application:
    app = web.Application(
        middlewares=[request_middleware,
                     admission_middleware(settings.max_concurrent_requests, settings.request_queue_seconds)],
        client_max_size=1024**2,
        # Bodies are read exactly as sent: a compressed one is refused (see web.body_encoding).
        handler_args={"auto_decompress": False})
    app[SETTINGS] = settings
    app[BACKGROUND] = background
    app[BACKLOG] = Backlog()
    app[SCHEMA_VERSION] = max(m.version for m in load_migrations(settings.migrations_dir))
    ctx = invoicing.InvoiceContext(
        cipher=cipher_from_settings(settings),
        khqr_ttl=timedelta(minutes=settings.khqr_ttl_minutes),
        base_url=settings.base_url,
    )

    async def database(app: web.Application) -> AsyncIterator[None]:
        pool = await create_pool(dsn, settings)
        try:
            await check_pii_keys(pool, ctx.cipher)
            await provider_tokens.reencrypt(pool, ctx.cipher)
        except SettingsError:
            await pool.close()
            raise
        app[POOL] = pool
        app[AUTH] = Authenticator(pool)
        yield
        await app[BACKLOG].close()
        await pool.close()

    config = provider_config(settings)
    if unknown := unknown_variables(settings, os.environ):
        log.warning("ignored, not paysvc settings: %s", ", ".join(unknown))
    if "sandbox" in config and settings.database_url is not None:
        # Found by a security review: the default provider list is "sandbox", so a deployment that set the
        # secret to get going took simulated payments for real ones. Said by the service at start, not by every
        # command (a settlement import's one-line answers stay one line).
        log.warning("the sandbox provider is enabled (PAYSVC_PROVIDERS): anyone holding PAYSVC_SANDBOX_SECRET can "
                    "mark invoices paid with no money moved; list only real providers in production")

    async def payment_providers(app: web.Application) -> AsyncIterator[None]:
        try:
            providers = load_providers(config)
        except UnknownProvider as exc:
            raise SettingsError(f"PAYSVC_PROVIDERS: {exc}") from None
        except ProviderError as exc:
            where = f" (PAYSVC_{exc.provider.upper()}_…)" if exc.provider else ""
            raise SettingsError(f"payment provider settings{where}: {exc}") from None
        app[PROVIDERS] = providers
        yield
        for p in providers.values():
            await p.aclose()

    async def background_jobs(app: web.Application) -> AsyncIterator[None]:
        tasks = []
        if app[BACKGROUND]:
            pool = app[POOL]
            providers = app[PROVIDERS]
            cutoff = parse_cutoff(settings.business_day_cutoff)  # dates the exceptions capture and expiry open
            tasks.append(asyncio.create_task(run_periodically(
                "event-sequencer", settings.sequencer_interval_seconds, lambda: outbox.sequence_pending(pool))))
            tasks.append(asyncio.create_task(run_periodically(
                "inbox", settings.inbox_interval_seconds,
                lambda: inbox.work(pool, providers, lease=timedelta(seconds=settings.inbox_lease_seconds),
                                   business_cutoff=cutoff))))
            policy = PollPolicy(grace=timedelta(minutes=settings.bakong_grace_minutes),
                                give_up=timedelta(hours=settings.bakong_give_up_hours), business_cutoff=cutoff)
            for p in providers.values():
                if p.pattern == "pull":
                    poller = Poller(pool, p, policy, settings.bakong_poll_interval_seconds, cipher=ctx.cipher)
                    tasks.append(asyncio.create_task(poller.run()))
            tasks.append(asyncio.create_task(run_periodically(
                "expire-invoices", settings.expiry_interval_seconds,
                lambda: invoicing.expire_due(pool, cutoff=cutoff))))
            tasks.append(asyncio.create_task(run_periodically(
                "missing-in-settlement", 3600, settlement_import.overdue_check(pool, api_settlements.rules_of(settings)))))
            tasks.append(asyncio.create_task(run_periodically(
                "prune-idempotency-keys", 3600, lambda: invoicing.prune_idempotency_keys(
                    pool, retention=timedelta(hours=settings.idempotency_retention_hours)))))
            tasks.append(asyncio.create_task(run_periodically(
                "erase-payers", 3600, lambda: invoicing.erase_payers_past_retention(
                    pool, retention=timedelta(days=settings.payer_retention_days)))))
            tasks.append(asyncio.create_task(run_periodically(
                "prune-rejected-callbacks", 3600, lambda: inbox.prune_rejected(
                    pool, retention=timedelta(days=settings.inbox_rejected_retention_days)))))
        yield
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.cleanup_ctx.extend([database, payment_providers, background_jobs])
    add_routes(app, OPS_ROUTES)
    api_invoices.setup(app, ctx)
    api_ledger.setup(app)
    api_events.setup(app)
    api_providers.setup(app)
    api_reconciliation.setup(app)
    api_refunds.setup(app)
    api_settlements.setup(app)
    treasury_pages.setup(app)
    pages.setup(app)
    return app
