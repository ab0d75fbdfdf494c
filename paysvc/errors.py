"""Domain errors with a stable type; one middleware turns them into RFC 9457 problem responses."""

from __future__ import annotations

from typing import Any


class Problem(Exception):
    """An error the caller can act on. ``slug`` is stable; ``detail`` says what to fix."""

    status: int = 400
    slug: str = "bad-request"
    title: str = "Bad request"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}  # HTTP headers the answer carries (Allow on a 405, say)
        self.extra = extra

    @property
    def type_uri(self) -> str:
        return f"urn:paysvc:problem:{self.slug}"

    def to_dict(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        body.update(self.extra)
        return body


def _problem(status: int, slug: str, title: str) -> type[Problem]:
    return type(
        "".join(p.capitalize() for p in slug.split("-")), (Problem,), {"status": status, "slug": slug, "title": title}
    )


MalformedRequest = _problem(400, "malformed-request", "Malformed request")
ValidationFailed = _problem(422, "validation-error", "Request is not valid")
Unauthenticated = _problem(401, "unauthenticated", "Missing or unknown API key")
Forbidden = _problem(403, "forbidden", "API key lacks the scope for this action")
NotFound = _problem(404, "not-found", "Not found")
MethodNotAllowed = _problem(405, "method-not-allowed", "Method not allowed")
Conflict = _problem(409, "conflict", "Conflict with the current state")
IdempotencyInProgress = _problem(409, "idempotency-in-progress", "A request with this Idempotency-Key is still running")
IdempotencyMismatch = _problem(
    422, "idempotency-key-reused", "Idempotency-Key was already used with a different request"
)
InvalidState = _problem(409, "invalid-state", "Not allowed in the current state")
RequestTimeout = _problem(408, "request-timeout", "Request body not received in time")
PayloadTooLarge = _problem(413, "payload-too-large", "Request body too large")
UnsupportedMediaType = _problem(415, "unsupported-media-type", "Unsupported content type")
ServiceUnavailable = _problem(503, "unavailable", "Service unavailable")
# Too many requests in flight on this instance for too long: nothing was done; the problem's
# ``retry_after_seconds`` (also the Retry-After header) says when to try again.
Busy = _problem(503, "busy", "Service busy")
# The client hung up before its request was read (the status nginx uses); never delivered, but logged and
# counted as what it was rather than as an internal error.
ClientClosedRequest = _problem(499, "client-closed-request", "Client closed the request")


class FieldValueError(ValueError):
    """A rule checked on the whole model whose error belongs to one field: reported under that field's name
    (a model validator's error has no field of its own)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def invalid(exc, what: str = "fields") -> Problem:
    """A 422 whose ``detail`` names the first error and how many more (found by a portal developer's walk-through:
    every 422 said only "some fields are not valid; see errors", and a log line or an alert shows only the detail)."""
    errors = pydantic_errors(exc)
    first = errors[0] if errors else {"field": "(body)", "message": "not valid"}
    more = f" (and {len(errors) - 1} more: see errors)" if len(errors) > 1 else ""
    return ValidationFailed(f"{what} not valid: {first['field']}: {first['message']}{more}", errors=errors)


def pydantic_errors(exc) -> list[dict[str, Any]]:
    """Per-field errors from a pydantic ``ValidationError``: a dotted field path, the message and its code.

    A validator's own ``ValueError`` is given in its words (without pydantic's "Value error, " prefix)."""
    out = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        message = err["msg"]
        cause = err.get("ctx", {}).get("error")
        if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            message = "must be a JSON object"  # not pydantic's "... or instance of InvoiceCreate"
        elif isinstance(cause, ValueError):
            message = str(cause)
            if isinstance(cause, FieldValueError):
                loc.append(cause.field)
        out.append({"field": ".".join(loc) or "(body)", "message": message, "code": err["type"]})
    return out
