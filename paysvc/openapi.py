"""``/openapi.json``, generated from the route table and the pydantic models the views use."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from paysvc import __version__
from paysvc.web import Route

_PARAM = re.compile(r"\{(\w+)\}")

# Routes that read their request themselves, and the errors they answer with instead of 422
_OWN_ERRORS = {
    ("GET", "/v1/invoices/{id}/qr.png"): {"400": "scale is not an integer from 2 to 20"},
    ("POST", "/v1/providers/{name}/callbacks"): {
        "400": "the callback cannot be read as this provider's (kept, marked, never processed)",
        "401": "the callback's signature is not valid, or its timestamp is too far off (kept, never processed)",
        "413": "the body is over 64 KiB (not stored)", "415": "the body is not application/json, or is compressed",
        "431": "the headers are over 16 KiB (not stored)"},
}

# The routes that answer 409, and why (the problem's detail says which case it is)
_NOT_OPEN = "the invoice is not open (paid, expired or cancelled): it has no code to pay"
_CONFLICTS = {
    ("POST", "/v1/invoices"): "the reference is taken by another invoice, or a request with this Idempotency-Key "
                              "is still running (Retry-After: 1)",
    ("POST", "/v1/invoices/{id}/cancel"): "the invoice is not open (`invoice_status` says what it is: `cancelled` "
                                          "when a cancel already went through), or treasury applied money to it",
    ("GET", "/v1/invoices/{id}/khqr"): _NOT_OPEN,
    ("GET", "/v1/invoices/{id}/qr.png"): _NOT_OPEN,
    ("GET", "/v1/invoices/{id}/qr.svg"): _NOT_OPEN,
    ("POST", "/v1/reconciliation/exceptions/{id}/resolve"): "the exception is already resolved",
    ("POST", "/v1/settlements"): "these bytes were imported before for another provider, day or format (the "
                                   "problem names that settlement)",
    ("POST", "/v1/providers/{name}/callbacks"): "the same signed callback again: a replay",
}


_LOCATION = {"description": "where to go next", "schema": {"type": "string"}}


def build_openapi(routes: list[Route], base_url: str) -> dict[str, Any]:
    models: set[type[BaseModel]] = set()
    for r in routes:
        for m in (r.body, r.response):
            if m is not None:
                models.add(m)
    ordered = sorted(models, key=lambda m: m.__name__)
    keys = [(m, mode) for m in ordered for mode in ("validation", "serialization")]
    refs, top = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    schemas = top.get("$defs", {})

    problem_ref = {"$ref": "#/components/schemas/Problem"}
    schemas["Problem"] = {
        "type": "object",
        "description": "RFC 9457 problem details",
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}, "instance": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "object", "properties": {
                "field": {"type": "string"}, "message": {"type": "string"}, "code": {"type": "string"}}}},
        },
        "required": ["type", "title", "status", "detail"],
    }
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "operationId": f"{r.method.lower()}_{r.handler.__name__}",
                              "tags": list(r.tags)}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in _PARAM.findall(r.path)]
        if r.query is not None:
            qs = r.query.model_json_schema()
            for name, prop in qs.get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": name in qs.get("required", []),
                               "schema": prop})
        if r.method == "POST" and r.path == "/v1/invoices":
            params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "maxLength": 255}})
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": refs[(r.body, "validation")]}}}
        if r.response is not None:
            content = {r.content_type: {"schema": refs[(r.response, "serialization")]}}
        else:
            content = {r.content_type: {}}
        # Found by a portal developer's walk-through: no header a portal relies on, and no error case, was
        # documented. Every answer carries X-Request-Id; the errors a route can give are listed by cause.
        success: dict[str, Any] = {"description": "success", "content": content,
                                   "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}}
        if r.status in (204, 303):  # no body (found by fuzzing: a 204 was documented with one)
            del success["content"]
        if r.status == 303:
            success["description"] = "done: on to the page the Location header names"
            success["headers"]["Location"] = _LOCATION
        if "pages" in r.tags and r.content_type != "application/json":
            # Pages answer their errors as pages, not as problem documents (found by fuzzing).
            responses = {str(r.status): success}
            if r.path.startswith("/treasury") and r.path != "/treasury/login":
                responses.setdefault("303", {"description": "without a treasury session (or with an expired one): "
                                                            "on to the login page",
                                             "headers": {"Location": _LOCATION}})
            responses["default"] = {"description": "an error: a page that says what went wrong and what to do",
                                    "content": {"text/html": {}}}
            op["responses"] = responses
            paths.setdefault(r.path, {})[r.method.lower()] = op
            continue
        if r.method == "POST" and r.path == "/v1/invoices":
            success["headers"].update({
                "Location": {"description": "the invoice's URL", "schema": {"type": "string"}},
                "Idempotent-Replayed": {"description": "`true` when this is the first answer to this "
                                                       "Idempotency-Key again", "schema": {"type": "string"}}})
        problem = {"application/problem+json": {"schema": problem_ref}}
        errors = {}
        if r.scope:
            errors["401"] = "no API key, or an unknown or revoked one"
            errors["403"] = f"the key lacks the `{r.scope}` scope, or the action needs another kind of key"
        if _PARAM.search(r.path):
            errors["404"] = "not found, or not this key's agency's"
        if r.body is not None:
            errors["400"] = "the body is not JSON, or is malformed"
            errors["413"] = "the body is too large"
            errors["415"] = "the body is not application/json"
        if (r.method, r.path) in _OWN_ERRORS:   # routes that read their request themselves (found by review)
            errors.update(_OWN_ERRORS[(r.method, r.path)])
        elif r.body is not None or r.query is not None:
            errors["422"] = "a field is not valid: `detail` names the first, `errors` lists each"
        if (r.method, r.path) in _CONFLICTS:
            errors["409"] = _CONFLICTS[(r.method, r.path)]
        responses: dict[str, Any] = {str(r.status): success}
        for status, why in sorted(errors.items()):
            responses[status] = {"description": why, "content": problem}
        responses["503"] = {"description": "the database is unavailable: retry after Retry-After seconds",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}}, "content": problem}
        responses["default"] = {"description": "error", "content": problem}
        op["responses"] = responses
        if r.scope:
            op["security"] = [{"apiKey": []}]
            op["description"] = f"Requires an API key with scope `{r.scope}`."
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "paysvc", "version": __version__,
                 "description": "Fee invoices with dynamic KHQR codes, payments, ledger and reconciliation."},
        "servers": [{"url": base_url}],
        "paths": paths,
        "components": {"schemas": schemas,
                       "headers": {"X-Request-Id": {
                           "description": "the request's id, in the service's log: the client's own X-Request-Id "
                                          "when it sent one of at most 100 characters, else a new one",
                           "schema": {"type": "string"}}},
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
    }
