"""HTTP plumbing shared by the API modules: typed app keys, a route table that also feeds
``/openapi.json``, body and query parsing into pydantic models, and the error/logging middleware."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from types import UnionType
from typing import Annotated, Any, Awaitable, Callable, Union, get_args, get_origin

import asyncpg
import prometheus_client
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, BeforeValidator, ValidationError

from paysvc.auth import Authenticator, Principal
from paysvc.errors import (
    Busy, ClientClosedRequest, MalformedRequest, MethodNotAllowed, NotFound, PayloadTooLarge, Problem, RequestTimeout,
    ServiceUnavailable,
    UnsupportedMediaType, ValidationFailed, invalid,
)
from paysvc.settings import Settings
from providers.models import DuplicateKey, unique_keys

log = logging.getLogger("paysvc.http")

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
AUTH = web.AppKey("auth", Authenticator)
BACKGROUND = web.AppKey("background", bool)  # False in tests that drive background jobs by hand
ROUTES = web.AppKey("routes", list)
PROVIDERS = web.AppKey("providers", dict)  # name -> providers.Provider, the ones enabled by settings
REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
MAX_JSON_BODY = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    """One endpoint, as served and as documented."""

    method: str
    path: str
    handler: Handler
    summary: str
    scope: str | None = None          # required API-key scope; None = public
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    query: type[BaseModel] | None = None
    content_type: str = "application/json"
    tags: tuple[str, ...] = field(default_factory=tuple)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return web.Response(
        body=json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode(),
        status=status, content_type="application/json", headers=headers,
    )


def body_encoding(request: web.Request) -> str | None:
    """The request body's Content-Encoding when it is not ``identity``.

    The server reads every body as sent and never decompresses it (``auto_decompress`` is off in
    ``create_app``): a compressed body is refused, so no endpoint has to reason about sizes before and after
    decompression, or about a small body that expands without bound.
    """
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    return encoding if encoding and encoding != "identity" else None


def refuse_encoded_body(request: web.Request) -> None:
    if (encoding := body_encoding(request)) is not None:
        raise UnsupportedMediaType(f"send the body uncompressed: Content-Encoding {encoding!r} is not accepted")


# A body must arrive whole within this many seconds of the request's headers: one that stalls is answered 408
# instead of holding the request (and, before the admission middleware's pre-read, a slot) open for ever.
BODY_SECONDS = 10.0
_PREREAD = web.RequestKey("preread", bytes)  # the body, read before the request was admitted (admission_middleware)
PREREAD_LIMIT = MAX_JSON_BODY  # JSON bodies and callbacks (64 KiB each) are read before admission


async def _receive(request: web.Request, limit: int) -> bytes:
    """Up to ``limit`` + 1 bytes of the body (one more tells a body past the limit), within BODY_SECONDS."""
    # read(n) returns what has arrived so far, not n bytes: a body split over several TCP segments needs
    # several reads (one read took only the first segment of a slow or large body).
    buf = bytearray()
    try:
        async with asyncio.timeout(BODY_SECONDS):
            while len(buf) <= limit:
                chunk = await request.content.read(limit + 1 - len(buf))
                if not chunk:
                    break
                buf += chunk
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {BODY_SECONDS:g} s ({len(buf)} bytes came): send it "
                             "whole, at once") from None
    return bytes(buf)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refused with 413 past ``limit`` bytes (declared or actually sent), 408 if it stalls."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes")
    buf = request.get(_PREREAD)
    if buf is None or (len(buf) > PREREAD_LIMIT and limit > PREREAD_LIMIT):
        buf = (buf or b"") + await _receive(request, limit - len(buf or b""))
    if len(buf) > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes")
    if request.content_length is not None and len(buf) < request.content_length:
        raise ClientClosedRequest(f"the connection closed after {len(buf)} of the {request.content_length} "
                                  "bytes announced by Content-Length")
    return bytes(buf)


# What aiohttp raises for a form body it cannot read: a missing or wrong multipart boundary, text not in its
# charset (UnicodeDecodeError is a ValueError), an unknown charset (LookupError), an unknown
# Content-Transfer-Encoding (RuntimeError), a part header it cannot parse, such as one holding a NUL
# (HttpProcessingError). Caught around form parsing only, where nothing else raises them.
UNREADABLE_FORM = (ValueError, LookupError, RuntimeError, HttpProcessingError)


class _NotJsonConstant(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    """NaN, Infinity and -Infinity are not JSON (RFC 8259), though Python's json reads them: refused as syntax,
    not passed on to be refused as a type (found by a portal developer's walk-through: "amount": NaN was a 422
    saying it must be an integer)."""
    raise _NotJsonConstant(name)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, with clear errors for the wrong type, size or syntax."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"send the body as application/json (got {request.content_type or 'none'})")
    refuse_encoded_body(request)
    raw = await read_body(request, MAX_JSON_BODY)
    if b"\x00" in raw:
        raise MalformedRequest("text must not contain NUL characters (\\u0000)")
    try:
        doc = json.loads(raw, object_pairs_hook=unique_keys, parse_constant=_refuse_constant)
        if b"\\u0000" in raw and _holds_nul(doc):  # only an escape can make a NUL; "\\\\u0000" is none
            raise MalformedRequest("text must not contain NUL characters (\\u0000)")
        if b"\\ud" in raw or b"\\uD" in raw:  # only an escape can make an unpaired surrogate
            _refuse_lone_surrogates(doc)
        return doc
    except DuplicateKey as exc:
        raise MalformedRequest(f"body is ambiguous: {exc}; send each key once") from None
    except _NotJsonConstant as exc:
        raise MalformedRequest(f"body is not valid JSON: {exc} is not a JSON value (Python's json writes it for a "
                               "float that is not a number)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedRequest("body is nested too deeply to read") from None
    except ValueError as exc:  # an integer literal of thousands of digits (Python's int_max_str_digits)
        log.info("JSON body refused: %s", exc)
        raise MalformedRequest(f"body cannot be read: a number in it has more than {sys.get_int_max_str_digits()} "
                               "digits") from None


def _holds_nul(value: Any) -> bool:
    """Whether any string or key in the parsed JSON ``value`` holds a NUL character."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def _refuse_lone_surrogates(value: Any) -> None:
    """Refuse text holding an unpaired UTF-16 surrogate (``"\\udc80"`` alone): no database or encoder can
    store it, and a field accepted as it is would fail only later, after its invoice was written."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedRequest("text must not contain an unpaired UTF-16 surrogate (a \\ud800-\\udfff "
                                   "escape without its pair); remove it") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _refuse_lone_surrogates(k)
            _refuse_lone_surrogates(v)
    elif isinstance(value, list):
        for v in value:
            _refuse_lone_surrogates(v)


def parse_model(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None


# Headers whose second copy would be ignored or read differently by whoever reads them: refused when repeated.
SINGLE_HEADERS = ("Authorization", "Content-Type", "Content-Encoding")  # Idempotency-Key: refused where read


def refuse_repeated(request: web.Request) -> None:
    """Refuse an API request that gives one of SINGLE_HEADERS, or any query parameter, more than once (which
    copy counts would depend on who reads it; found by a fuzz audit: the first Authorization was used, a second
    Content-Encoding ignored). Provider callbacks are exempt: they are stored with every header as received,
    and judged by their provider. Pages outside /v1 read their parameters themselves."""
    if not request.path.startswith("/v1/") or request.path.startswith("/v1/providers/"):
        return
    for name in SINGLE_HEADERS:
        if len(request.headers.getall(name, ())) > 1:
            raise MalformedRequest(f"header {name} is given more than once; give it once")
    _refuse_repeated_query(request)


def _refuse_repeated_query(request: web.Request) -> None:
    repeated = sorted({k for k in request.query.keys() if len(request.query.getall(k)) > 1})
    if repeated:
        raise ValidationFailed(f"query parameter {repeated[0]!r} is given more than once; give it once",
                               errors=[{"field": k, "message": "given more than once", "code": "repeated"}
                                       for k in repeated])


WHOLE_NUMBER = re.compile(r"-?[0-9]+")


@functools.cache  # per model class: read on every request that parses a query
def _int_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of a query model that take a whole number (``int`` or ``int | None``)."""
    def bare(t):
        return get_args(t)[0] if get_origin(t) is Annotated else t

    out = set()
    for name, info in model.model_fields.items():
        ann = bare(info.annotation)
        if ann is int or (get_origin(ann) in (Union, UnionType) and int in map(bare, get_args(ann))):
            out.add(info.alias or name)
    return frozenset(out)


def parse_query(model: type[BaseModel], request: web.Request) -> BaseModel:
    _refuse_repeated_query(request)  # on admission already for API requests; here for whatever calls it
    query = dict(request.query)
    for name in _int_fields(model):
        # pydantic also reads 5.0, +5 and 1_0 as whole numbers (found by fuzzing): a number in a query is
        # written with digits only
        if name in query and not WHOLE_NUMBER.fullmatch(query[name]):
            raise ValidationFailed(f"{name} must be a whole number written with the digits 0-9, e.g. {name}=50; "
                                   f"got {query[name][:40]!r}",
                                   errors=[{"field": name, "message": "not a whole number", "code": "int_parsing"}])
    try:
        return model.model_validate(query)
    except ValidationError as exc:
        raise invalid(exc, "query parameters") from None


_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]")
_SPACE_FOR_PLUS = re.compile(r"[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)? [0-9]{2}(:?[0-9]{2})?$")


def _date_time_text(value: object) -> object:
    """A query's time is written as an ISO 8601 date and time: pydantic would also read a bare number as seconds
    since 1970, and a date alone as a local midnight (found by a walk-through: created_from=1700000000 was taken
    silently)."""
    if isinstance(value, str):
        if _SPACE_FOR_PLUS.search(value):
            raise ValueError("a + in a query string reads as a space: write the offset's + as %2B, e.g. "
                             "2026-01-31T00:00:00%2B07:00")
        if not _DATE_TIME.match(value):
            raise ValueError("must be an ISO 8601 date and time with its UTC offset, e.g. 2026-01-31T00:00:00+07:00 "
                             "or 2026-01-30T17:00:00Z")
    return value


# A time in a query string: ISO 8601 only (see require_offset for the offset)
QueryTime = Annotated[datetime, BeforeValidator(_date_time_text)]


def require_offset(name: str, value: datetime | None) -> None:
    """Refuse a time without a UTC offset: which instant it means would depend on the server's zone."""
    if value is not None and value.tzinfo is None:
        raise ValidationFailed(f"{name} needs a UTC offset, e.g. 2026-01-31T00:00:00+07:00",
                               errors=[{"field": name, "message": "timezone offset required",
                                        "code": "timezone_aware"}])


async def principal(request: web.Request, scope: str) -> Principal:
    p = await request.app[AUTH].authenticate(request.headers.get("Authorization"))
    p.require(scope)
    request[PRINCIPAL] = p
    return p


async def reader(request: web.Request) -> Principal:
    """The caller of a read that an agency's key makes for its own data (with ``invoices:read``) and a treasury key
    for every agency's."""
    p = await request.app[AUTH].authenticate(request.headers.get("Authorization"))
    request[PRINCIPAL] = p
    p.require("invoices:read" if p.agency_id is not None else "treasury")
    return p


def add_routes(app: web.Application, routes: list[Route]) -> None:
    if ROUTES not in app:
        app[ROUTES] = []
    for r in routes:
        if r.method == "GET":  # HEAD too, wherever GET is allowed (RFC 9110; aiohttp sends no body for it)
            app.router.add_get(r.path, r.handler, allow_head=True)
        else:
            app.router.add_route(r.method, r.path, r.handler)
        app[ROUTES].append(r)


def problem_response(problem: Problem, request: web.Request) -> web.Response:
    retry_after = problem.extra.get("retry_after_seconds")
    headers = dict(problem.headers)
    if retry_after:
        headers["Retry-After"] = str(retry_after)
    if problem.slug == "unauthenticated":
        # RFC 9110: a 401 names the scheme to authenticate with (RFC 6750: Bearer). Only for API keys: a provider's
        # callback refused for its signature is a 401 of another scheme (found by review)
        headers.setdefault("WWW-Authenticate", 'Bearer realm="paysvc"')
    return web.Response(
        body=json.dumps(problem.to_dict(request.path), ensure_ascii=False).encode(),
        status=problem.status, content_type="application/problem+json", headers=headers or None,
    )


HTTP_REQUESTS = prometheus_client.Counter(
    "paysvc_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
HTTP_SECONDS = prometheus_client.Histogram(
    "paysvc_http_request_duration_seconds", "Time to answer an HTTP request", ["method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


def _route_label(request: web.Request) -> str:
    """The route's template (``/v1/invoices/{id}``), so metrics do not grow a series per invoice id."""
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    return resource.canonical if resource is not None else "unmatched"


DATABASE_RETRY_SECONDS = 5


def database_gone(exc: BaseException) -> bool:
    """Whether an asyncpg error says the database cannot be used now (not that a statement was wrong): it does not
    accept connections (shutting down, or ``ALLOW_CONNECTIONS false``), or the connection ended mid-operation
    (asyncpg then reports the connection closed, or an operation it can no longer finish)."""
    if isinstance(exc, asyncpg.InternalClientError):
        return True   # e.g. "cannot switch to state 12; another operation (2) is in progress" after a backend ended
    text = str(exc)
    if type(exc) is asyncpg.ObjectNotInPrerequisiteStateError:   # 55000 exactly, not its lock/in-use subclasses
        return "accepting connections" in text
    if isinstance(exc, asyncpg.InterfaceError):
        return "connection is closed" in text or "connection was closed" in text
    return False


# asyncpg's protocol states 2 (consuming an error the server sent) and 4 (terminating): the server ended the
# connection, its FATAL read before the socket's end, and the next statement finds the connection in that state
_ENDED_BY_THE_SERVER = re.compile(r"another operation \((2|4)\) is in progress")


def looks_like_misuse(exc: BaseException) -> bool:
    """Whether a database error that ``database_gone`` takes for an outage should keep its stack trace in the log:
    an asyncpg ``InternalClientError`` is also what two operations on one connection look like (a bug of ours),
    except when the operation in progress is the server's own error being read, which is how a connection the
    server ended while idle in the pool fails its next statement (found when CI met it in the outage test: a
    stack trace for an outage)."""
    return isinstance(exc, asyncpg.InternalClientError) and not _ENDED_BY_THE_SERVER.search(str(exc))


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, access log, and every error as an RFC 9457 problem (never a stack trace)."""
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    if len(request_id) > 100:
        request_id = uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    try:
        try:
            if "\x00" in request.path or "\x00" in request.query_string:
                raise MalformedRequest("the URL must not contain NUL characters (%00)")
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404:
                raise NotFound(f"no such resource: {request.method} {request.path}") from None
            if exc.status == 405:
                allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
                # RFC 9110: a 405 says what is allowed.
                raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}; allowed: "
                                       f"{', '.join(allowed) or 'none'}",
                                       headers={"Allow": ", ".join(allowed)}) from None
            if exc.status == 413:
                raise PayloadTooLarge("request body too large") from None
            if exc.status < 400:
                raise
            raise Problem(exc.reason or "request refused") from None
        except (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError, UnicodeEncodeError):
            # Refused before anything was written: input the database cannot store as text.
            raise MalformedRequest("the request holds characters that cannot be stored as text (NUL or an "
                                   "unpaired UTF-16 surrogate); remove them") from None
        except asyncpg.DataError as exc:
            # A value the database cannot hold or compare (a number past 64 bits, a date past its range, text
            # it cannot read): refused by the statement, so nothing of it was written.
            log.warning("request refused by the database as out of range: %s", exc, extra={"request_id": request_id})
            raise MalformedRequest("a value in this request is out of range: numbers must fit in 64 bits and dates "
                                   "must be real dates, years 1 to 9999 once in UTC") from None
        except OverflowError as exc:
            log.warning("request refused as out of range: %s", exc, extra={"request_id": request_id})
            raise MalformedRequest(f"a date or number in this request is out of range ({exc})") from None
        except ConnectionResetError:
            # The client hung up (aiohttp raises this while reading its body): nothing was done for it.
            raise ClientClosedRequest("the connection closed before the request was read") from None
        except (asyncpg.PostgresConnectionError, asyncpg.TooManyConnectionsError, asyncpg.CannotConnectNowError,
                asyncpg.AdminShutdownError, OSError) as exc:
            log.error("database unavailable: %s", exc, extra={"request_id": request_id})
            raise ServiceUnavailable("the database is unavailable; retry later (with the same Idempotency-Key "
                                     "for a create)", retry_after_seconds=DATABASE_RETRY_SECONDS) from None
        except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            if not database_gone(exc):
                raise
            # Found by an operator's walk-through: a database that stopped accepting connections, or whose
            # connections were ended mid-request, was answered 500 with a stack trace in the log. asyncpg's
            # InternalClientError is also what a bug in its use looks like, so that one keeps its stack trace
            # (found by review).
            log.error("database unavailable: %s: %s", type(exc).__name__, exc, extra={"request_id": request_id},
                      exc_info=looks_like_misuse(exc))
            raise ServiceUnavailable("the database is unavailable; retry later (with the same Idempotency-Key "
                                     "for a create)", retry_after_seconds=DATABASE_RETRY_SECONDS) from None
    except Problem as problem:
        response = problem_response(problem, request)
    except web.HTTPException as exc:  # redirects and the like: aiohttp sends them; we add the request id
        exc.headers["X-Request-Id"] = request_id
        log.info("%s %s %s", request.method, request.path, exc.status,
                 extra={"request_id": request_id, "method": request.method, "path": request.path,
                        "status": exc.status, "duration_ms": round((time.perf_counter() - started) * 1000, 2)})
        raise
    except Exception:
        log.exception("unhandled error", extra={"request_id": request_id})
        problem = Problem("an internal error occurred; it has been logged with request id " + request_id)
        problem.status, problem.slug, problem.title = 500, "internal-error", "Internal error"
        response = problem_response(problem, request)
    response.headers["X-Request-Id"] = request_id
    if request.path.startswith("/v1/") and not response.prepared and "Cache-Control" not in response.headers:
        # API answers carry payer data and keys' views: no cache (a browser's, a proxy's) keeps them. Found by a
        # portal developer's walk-through: the public pages said no-store, the invoice with its payer did not.
        response.headers["Cache-Control"] = "no-store"
    elapsed = time.perf_counter() - started
    route = _route_label(request)
    HTTP_REQUESTS.labels(request.method, route, str(response.status)).inc()
    HTTP_SECONDS.labels(request.method, route).observe(elapsed)
    p: Principal | None = request.get(PRINCIPAL)
    log.info(
        "%s %s %s", request.method, request.path, response.status,
        extra={
            "request_id": request_id, "method": request.method, "path": request.path, "status": response.status,
            "duration_ms": round(elapsed * 1000, 2),
            "key_id": p.key_id if p else None,
        },
    )
    return response


UNMETERED = frozenset({"/healthz", "/readyz", "/metrics"})


def admission_middleware(max_concurrent: int, queue_seconds: float):
    """At most ``max_concurrent`` requests run at once on this instance; one that cannot start within
    ``queue_seconds`` is answered 503 ``busy`` with Retry-After, having done nothing.

    Without it an overloaded instance queues without bound (measured: past its capacity, answers took 15 to
    45 s while clients had long given up, and the work for them still ran). Shedding early keeps the answers
    it does give fast, and every caller can retry: a portal with its Idempotency-Key, a provider by
    re-sending its callback (nothing was stored, nothing acknowledged). Health and metrics are never queued.
    """
    slots = asyncio.Semaphore(max_concurrent)
    receiving_max = 4 * max_concurrent  # bodies being received before admission, 64 KiB at most each
    receiving = asyncio.Semaphore(receiving_max)
    retry_after = max(1, round(queue_seconds))

    @web.middleware
    async def admission(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNMETERED:
            return await handler(request)
        refuse_repeated(request)
        if (request.body_exists and request.content_type == "application/json"
                and (request.content_length is None or request.content_length <= PREREAD_LIMIT)):
            # A JSON body is read before the request takes a slot: a client that announces a body and sends it
            # slowly, or never, would otherwise hold a slot until it gave up, and a few dozen such clients would
            # have every request answered busy (found by a fuzz audit). Its own bound keeps the memory this can
            # take in check; BODY_SECONDS bounds the wait.
            try:
                async with asyncio.timeout(queue_seconds):  # not wait_for: see paysvc.background
                    await receiving.acquire()
            except TimeoutError:
                BUSY.inc()
                raise Busy(f"this instance is receiving {receiving_max} request bodies; retry in {retry_after} s",
                           retry_after_seconds=retry_after) from None
            try:
                request[_PREREAD] = await _receive(request, PREREAD_LIMIT)
            finally:
                receiving.release()
        try:
            async with asyncio.timeout(queue_seconds):
                await slots.acquire()
        except TimeoutError:
            BUSY.inc()
            raise Busy(f"this instance has had {max_concurrent} requests in progress for {queue_seconds:g} s; "
                       f"retry in {retry_after} s", retry_after_seconds=retry_after) from None
        try:
            return await handler(request)
        finally:
            slots.release()

    return admission


BUSY = prometheus_client.Counter("paysvc_http_requests_shed_total",
                                 "Requests answered 503 busy because too many were in progress")
