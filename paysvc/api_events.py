"""The events API (feed and replay, public keys, webhooks) and the background relay and webhook worker."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, AsyncIterator, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from paysvc import api_invoices, outbox
from paysvc.errors import FieldValueError, NotFound, ValidationFailed
from paysvc.event_keys import EventSigner, KeySet, signer_from_settings
from paysvc.outbox import EVENT_TYPES
from paysvc.queries import Q
from paysvc.relay import Relay, envelope, envelope_body
from paysvc.auth import Principal
from paysvc.web import (AUTH, BACKGROUND, POOL, PRINCIPAL, SETTINGS, Route, add_routes, json_response, parse_model, parse_query,
                        principal, read_json)
from paysvc.webhook_targets import Destinations, client_session, destinations_from_settings
from paysvc.webhooks import WebhookWorker, create_endpoint, url_problem

EVENT_SIGNER = web.AppKey("event_signer", object)  # EventSigner, or None when nothing signs (no broker)
WEBHOOK_DESTINATIONS = web.AppKey("webhook_destinations", Destinations)
EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]
_FEED_SCOPE = "invoices:read (own agency) or treasury with agency=CODE"


SIGNED_LIMIT = 100


class FeedQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    after: Annotated[int, Field(ge=0, description="return events with seq greater than this")] = 0
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    agency: str | None = Field(None, description="agency code (treasury and admin keys only)")
    signed: bool = Field(False, description="also return each event as the broker carries it (exact body, key id, "
                                           f"signature), to verify with GET /v1/keys/events; limit at most "
                                           f"{SIGNED_LIMIT} then")

    @model_validator(mode="after")
    def _signed_pages_are_short(self) -> "FeedQuery":
        if self.signed and self.limit > SIGNED_LIMIT:
            # Signing runs on the request's event loop (about 33 µs an event): a page of 1000 took 65 ms, so a
            # key could tie an instance up with a few requests. A signed copy is for replacing a message.
            raise FieldValueError("limit", f"with signed=true, at most {SIGNED_LIMIT} events a page: pass "
                                  f"limit={SIGNED_LIMIT} or less")
        return self


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    event_id: uuid.UUID
    type: str
    schema_version: int
    agency: str
    seq: int
    occurred_at: datetime
    data: dict[str, Any]


class SignedMessage(BaseModel):
    seq: int
    key_id: str = Field(description="the key that signed it (as the paysvc-key-id header)")
    signature: str = Field(description="base64 Ed25519 signature of body's UTF-8 bytes (as paysvc-signature)")
    body: str = Field(description="the exact message body; parsed, it is the event of the same seq in data")


class FeedPage(BaseModel):
    agency: str
    data: list[Event]
    messages: list[SignedMessage] | SkipJsonSchema[None] = Field(None, description="present with signed=true only")
    next_after: int = Field(description="pass as after= for the next page (the last seq returned, or after)")
    has_more: bool


class WebhookIn(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    url: Annotated[str, Field(max_length=2048)]
    event_types: Annotated[list[EventType], Field(min_length=1)]
    description: Annotated[str, Field(max_length=200)] = ""


class Webhook(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    id: uuid.UUID
    url: str
    event_types: list[str]
    description: str
    created_at: datetime


class WebhookCreated(Webhook):
    secret: str = Field(description="signs deliveries (Paysvc-Signature); shown only in this response")


class WebhookList(BaseModel):
    data: list[Webhook]


class AttemptOut(BaseModel):
    attempted_at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None
    manual: bool


class Delivery(BaseModel):
    id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    seq: int
    status: Literal["pending", "delivered", "failed", "cancelled"]
    attempts: int
    max_attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    attempt_log: list[AttemptOut]


class DeliveryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    before_seq: int | None = Field(None, description="page: deliveries of events before this seq")
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class DeliveryPage(BaseModel):
    data: list[Delivery]
    next_before_seq: int | None


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def feed(request: web.Request) -> web.Response:
    p = await _feed_principal(request)
    q: FeedQuery = parse_query(FeedQuery, request)  # type: ignore[assignment]
    pool = request.app[POOL]
    signer: EventSigner | None = request.app[EVENT_SIGNER]  # type: ignore[assignment]
    if q.signed and signer is None:
        raise ValidationFailed("this service signs no events (no PAYSVC_EVENT_SIGNING_KEYS): read the feed without "
                               "signed=true", errors=[{"field": "signed", "message": "no signing key is configured",
                                                       "code": "not_signing"}])
    if p.agency_id is not None:
        if q.agency is not None and q.agency != p.agency_code:
            # Another agency's data is not found, whether or not that agency exists (never "forbidden").
            raise NotFound(f"no events feed {q.agency!r} for this key: an agency's key reads only its own "
                           "events; leave out agency=")
        agency_id, code = p.agency_id, p.agency_code
    else:
        if q.agency is None:
            raise ValidationFailed("give agency=CODE: a treasury key reads one agency's feed at a time",
                                   errors=[{"field": "agency", "message": "required for treasury and admin keys",
                                            "code": "missing"}])
        row = await pool.fetchrow(Q.events_agency_by_code, q.agency)
        if row is None:
            raise NotFound(f"no agency with code {q.agency!r}")
        agency_id, code = row["id"], row["code"]
    async with pool.acquire() as conn:
        await outbox.sequence(conn, [agency_id])  # so a reader sees what committed a moment ago
        rows = await conn.fetch(Q.events_feed, agency_id, q.after, q.limit + 1)
        head = await conn.fetchval(Q.events_head, agency_id) if not rows and q.after > 0 else None
    if head is not None and q.after > head:
        # No seq past the newest was ever given: a cursor beyond it (mistyped, or kept from another agency or
        # database) would poll "safely" and never see the events in between (found by a consumer's walk-through).
        raise ValidationFailed(f"after={q.after} is past the newest event of {code}'s feed (seq {head}): pass the "
                               "last seq you processed (0 to start from the oldest kept)",
                               errors=[{"field": "after", "message": f"past the newest seq, {head}",
                                        "code": "past_newest"}])
    page = [envelope(r) for r in rows[:q.limit]]
    out: dict[str, Any] = {"agency": code, "data": page, "next_after": page[-1]["seq"] if page else q.after,
                           "has_more": len(rows) > q.limit}
    if q.signed:
        assert signer is not None
        # The bytes the relay sends for the same row, signed as it signs them: a consumer verifies a copy read
        # here exactly as a message from the broker (a message that failed verification is replaced by one
        # that passes, not by a copy trusted on the TLS certificate alone).
        bodies = [(e["seq"], envelope_body(e)) for e in page]
        out["messages"] = [{"seq": seq, "key_id": signer.active_key_id, "signature": signer.sign(b),
                            "body": b.decode()} for seq, b in bodies]
    return json_response(out)


async def _feed_principal(request: web.Request) -> Principal:
    """An agency's key (invoices:read) reads its own feed; a key without an agency needs treasury."""
    p = await request.app[AUTH].authenticate(request.headers.get("Authorization"))
    request[PRINCIPAL] = p
    p.require("invoices:read" if p.agency_id is not None else "treasury")
    return p


async def keys(request: web.Request) -> web.Response:
    signer: EventSigner | None = request.app[EVENT_SIGNER]  # type: ignore[assignment]
    body = signer.public_keys() if signer is not None else KeySet(keys=[])
    return json_response(body, headers={"Cache-Control": "public, max-age=300"})


async def create_webhook(request: web.Request) -> web.Response:
    p = await principal(request, "invoices:write")
    agency_id = p.require_agency()
    body: WebhookIn = parse_model(WebhookIn, await read_json(request))  # type: ignore[assignment]
    problem = url_problem(body.url, request.app[WEBHOOK_DESTINATIONS])
    if problem:
        raise ValidationFailed(problem, errors=[{"field": "url", "message": problem, "code": "value_error"}])
    async with request.app[POOL].acquire() as conn:
        row, secret = await create_endpoint(conn, request.app[api_invoices.CTX].cipher, agency_id=agency_id,
                                            url=body.url, event_types=sorted(set(body.event_types)),
                                            description=body.description, now=_now())
    return json_response(WebhookCreated(**dict(row), secret=secret), status=201)


async def list_webhooks(request: web.Request) -> web.Response:
    p = await principal(request, "invoices:read")
    rows = await request.app[POOL].fetch(Q.webhooks_list, p.require_agency())
    return json_response(WebhookList(data=[Webhook(**dict(r)) for r in rows]))


def _id(request: web.Request, name: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info[name])
    except ValueError:
        raise NotFound(f"no {what} {request.match_info[name]!r}") from None


async def _own_endpoint(request: web.Request, scope: str) -> uuid.UUID:
    p = await principal(request, scope)
    endpoint_id = _id(request, "id", "webhook")
    if await request.app[POOL].fetchrow(Q.webhooks_get, endpoint_id, p.require_agency()) is None:
        raise NotFound(f"no webhook {endpoint_id}")
    return endpoint_id


async def delete_webhook(request: web.Request) -> web.Response:
    p = await principal(request, "invoices:write")
    endpoint_id = _id(request, "id", "webhook")
    row = await request.app[POOL].fetchrow(Q.webhooks_delete, endpoint_id, p.require_agency(), _now())
    if not row["deleted"]:
        raise NotFound(f"no webhook {endpoint_id}")
    return web.Response(status=204)


async def deliveries(request: web.Request) -> web.Response:
    endpoint_id = await _own_endpoint(request, "invoices:read")
    q: DeliveryQuery = parse_query(DeliveryQuery, request)  # type: ignore[assignment]
    rows = await request.app[POOL].fetch(Q.webhooks_deliveries, endpoint_id, q.limit + 1, q.before_seq)
    page = [Delivery(**dict(r)) for r in rows[:q.limit]]
    return json_response(DeliveryPage(data=page, next_before_seq=page[-1].seq if len(rows) > q.limit else None))


async def replay(request: web.Request) -> web.Response:
    endpoint_id = await _own_endpoint(request, "invoices:write")
    delivery_id = _id(request, "delivery_id", "delivery")
    if await request.app[POOL].fetchval(Q.webhooks_replay, delivery_id, endpoint_id, _now()) is None:
        raise NotFound(f"no delivery {delivery_id} for webhook {endpoint_id} (or the webhook was deleted)")
    return json_response({"id": str(delivery_id), "status": "pending",
                          "detail": "queued: the worker sends it within seconds; see the deliveries list"},
                         status=202)


ROUTES = [
    Route("GET", "/v1/events", feed, "An agency's events in seq order, for catch-up and replay", scope=_FEED_SCOPE,
          query=FeedQuery, response=FeedPage, tags=("events",)),
    Route("GET", "/v1/keys/events", keys, "Public keys that verify event signatures (public)", response=KeySet,
          tags=("events",)),
    Route("POST", "/v1/webhooks", create_webhook, "Register a webhook endpoint; the secret is shown once",
          scope="invoices:write", body=WebhookIn, response=WebhookCreated, status=201, tags=("webhooks",)),
    Route("GET", "/v1/webhooks", list_webhooks, "The agency's webhook endpoints (no secrets)",
          scope="invoices:read", response=WebhookList, tags=("webhooks",)),
    Route("DELETE", "/v1/webhooks/{id}", delete_webhook, "Remove an endpoint; its waiting deliveries are cancelled",
          scope="invoices:write", status=204, tags=("webhooks",)),
    Route("GET", "/v1/webhooks/{id}/deliveries", deliveries, "Deliveries with every attempt, newest event first",
          scope="invoices:read", query=DeliveryQuery, response=DeliveryPage, tags=("webhooks",)),
    Route("POST", "/v1/webhooks/{id}/deliveries/{delivery_id}/replay", replay, "Send a delivery again now",
          scope="invoices:write", status=202, tags=("webhooks",)),
]


def setup(app: web.Application) -> None:
    settings = app[SETTINGS]
    app[EVENT_SIGNER] = signer_from_settings(settings)  # a missing required key fails here, at start
    app[WEBHOOK_DESTINATIONS] = destinations = destinations_from_settings(settings)
    add_routes(app, ROUTES)

    async def background(app: web.Application) -> AsyncIterator[None]:
        if not app[BACKGROUND]:
            yield
            return
        tasks = []
        session = client_session(destinations)  # its resolver keeps deliveries off non-public addresses
        worker = WebhookWorker(app[POOL], app[api_invoices.CTX].cipher, session, destinations=destinations,
                               timeout=settings.webhook_timeout_seconds,
                               per_endpoint=settings.webhook_concurrency_per_endpoint)
        tasks.append(asyncio.create_task(worker.run(settings.webhook_interval_seconds)))
        signer = app[EVENT_SIGNER]
        if settings.amqp_url is not None and isinstance(signer, EventSigner):
            relay = Relay(app[POOL], settings.amqp_url.get_secret_value(), signer,
                          exchange=settings.events_exchange, queue_prefix=settings.events_queue_prefix,
                          batch_size=settings.relay_batch_size, poll_interval=settings.relay_poll_interval_seconds,
                          idle_max=settings.relay_idle_max_seconds,
                          retention=timedelta(days=settings.events_retention_days))
            tasks.append(asyncio.create_task(relay.run()))
        yield
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()

    app.cleanup_ctx.append(background)
