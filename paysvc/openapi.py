"""``/openapi.json``, generated from the route table and the pydantic models the views use."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from paysvc import __version__
from paysvc.web import Route

_PARAM = re.compile(r"\{(\w+)\}")


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
        op["responses"] = {
            str(r.status): {"description": "success", "content": content},
            "default": {"description": "error", "content": {"application/problem+json": {"schema": problem_ref}}},
        }
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
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
    }
