"""Provider callbacks: store first, answer 2xx only once stored, then verify and capture."""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from paysvc import inbox
from paysvc.errors import NotFound, Problem
from paysvc.invoicing import now_utc
from paysvc.settlement_days import parse_cutoff
from paysvc.web import POOL, PROVIDERS, SETTINGS, Route, add_routes, body_encoding, json_response, read_body
from providers import NotConfirmed, SignatureError

MAX_CALLBACK_BODY = 64 * 1024
# A provider's callback carries a few headers; a request with more than this many bytes of them is refused
# before it is stored, as an oversize body is (found by a security review: 90 padding headers of 4 KB each
# were stored with every unauthenticated request, about 440 KB a row).
MAX_CALLBACK_HEADERS = 16 * 1024


class HeadersTooLarge(Problem):
    status = 431
    slug = "request-header-fields-too-large"
    title = "Request headers too large"


class CallbackRejected(Problem):
    status = 400
    slug = "callback-rejected"
    title = "Callback refused"


class BadSignature(Problem):
    status = 401
    slug = "bad-signature"
    title = "Callback signature not valid"


class Replayed(Problem):
    status = 409
    slug = "callback-replayed"
    title = "Callback already received"


class WrongContentType(Problem):
    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported content type"


async def callback(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    providers = request.app[PROVIDERS]
    if name not in providers:
        raise NotFound(f"no provider named {name!r} is enabled; enabled: {sorted(providers)}")
    header_bytes = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
    if header_bytes > MAX_CALLBACK_HEADERS:
        raise HeadersTooLarge(f"the request's headers are {header_bytes} bytes; a callback's must fit in "
                              f"{MAX_CALLBACK_HEADERS}")
    body = await read_body(request, MAX_CALLBACK_BODY)
    pool = request.app[POOL]
    if request.content_type != "application/json":
        # Kept as evidence like every other callback, but never processed.
        await inbox.store(pool, name, request.headers, body,
                          rejected=f"content type {request.content_type or 'none'} is not application/json")
        raise WrongContentType("send callbacks as application/json")
    if (encoding := body_encoding(request)) is not None:
        # Stored as received (still compressed), never processed.
        await inbox.store(pool, name, request.headers, body, rejected=f"content encoding {encoding} is not accepted")
        raise WrongContentType(f"send callbacks uncompressed: Content-Encoding {encoding!r} is not accepted")
    provider = providers[name]
    stored = await inbox.store(pool, name, request.headers, body,
                               lease=timedelta(seconds=request.app[SETTINGS].inbox_lease_seconds),
                               replay_key=inbox.replay_key(provider, request.headers, body, now=now_utc()))
    inbox_id = stored.id
    if stored.replay_of is not None:
        # The same signed message again (a provider's own retry signs anew): kept, never processed.
        raise Replayed(f"this callback was already received as inbox row {stored.replay_of} (the same signed "
                       f"timestamp and body); it is kept as inbox row {inbox_id} and not "
                       "processed again. To retry, sign the body anew with the current time",
                       inbox_id=inbox_id, first_inbox_id=stored.replay_of)
    # Stored and committed: from here on nothing is lost, whatever happens to this process.
    # Anyone can send an unsigned callback naming a bill number (they are in every code), so its answer must not
    # say what we hold: whether a bill number is an open invoice's (asked again later: 202) or not (200
    # not_confirmed), nor the inbox's row count (found by a security review: a sweep of bill numbers listed
    # every agency's open invoices). A malformed one is still told what is wrong with it.
    received = json_response({"status": "received"}) if provider.pattern == "push_confirm" else None
    try:
        outcome = await inbox.process(pool, providers, inbox_id, stored,
                                      business_cutoff=parse_cutoff(request.app[SETTINGS].business_day_cutoff))
    except Exception:
        request.app.logger.exception("processing inbox row %s failed; the inbox worker will retry", inbox_id)
        return received or json_response({"status": "accepted", "inbox_id": inbox_id}, status=202)
    if received and not (outcome.state == "rejected" and not isinstance(outcome.error, NotConfirmed)):
        return received
    if outcome.state == "rejected" and isinstance(outcome.error, NotConfirmed):
        # Heard and checked: the provider's own API says this payment did not go through.
        return json_response({"status": "not_confirmed", "inbox_id": inbox_id, "detail": outcome.reason})
    if outcome.state == "rejected":
        cls = BadSignature if isinstance(outcome.error, SignatureError) else CallbackRejected
        # An unsigned callback's sender gets what is wrong with it, not the inbox's row count (found by review)
        raise cls(outcome.reason or "callback refused", **({} if received else {"inbox_id": inbox_id}))
    if outcome.state == "deferred":
        return json_response({"status": "accepted", "inbox_id": inbox_id}, status=202)
    return json_response({
        "status": "processed", "inbox_id": inbox_id,
        "payments": [{"payment_id": r.payment_id, "new": r.created, "invoice_id": r.invoice_id,
                      "exception": r.reason} for r in outcome.results],
    })


ROUTES = [
    Route("POST", "/v1/providers/{name}/callbacks", callback,
          "Provider push notification; stored before it is verified, captured exactly once", tags=("providers",)),
]


def setup(app: web.Application) -> None:
    add_routes(app, ROUTES)
