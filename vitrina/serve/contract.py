"""What the HTTP API promises in its OpenAPI schema, kept true to what the server does.

Every error is ``{"error": "one line"}`` (``ErrorBody``), and every route lists the statuses it can
answer (``errors(...)``). Limits live in the schema: lengths and ranges through the usual field
constraints, the query grammar and the label list as patterns that the server checks with the very
same regular expressions. ``refine_openapi`` fixes what FastAPI cannot say by itself: a multipart
field is absent or a value, never ``null``; an upload must be an image; and ``POST /api/classify``
takes a file or an indexed image, not both. ``allowed_methods`` gives a 405 the ``Allow`` header of
the whole resource, not only of the first route that matched its path.

``tests/test_api_contract.py`` runs schemathesis with every check against a real app to keep it so.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.routing import Match
from starlette.types import Scope

MAX_ID = 2**53 - 1  # item ids are SQLite rowids; beyond 2**53 a JSON number (a float to many clients) is not exact
MAX_LABELS = 64
MAX_LABELS_CHARS = 4000
UPLOAD_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff")

# 2 to MAX_LABELS non-blank names, separated by commas; blank entries (", ,") are skipped.
_BLANK = r"[ \t\n\r]*"
_NAME = r"[ \t\n\r]*[^, \t\n\r][^,]*"
LABELS_PATTERN = rf"^(?:{_BLANK},)*{_NAME}(?:(?:,{_BLANK})*,{_NAME}){{1,{MAX_LABELS - 1}}}(?:,{_BLANK})*$"
_LABELS_RE = re.compile(LABELS_PATTERN)

_DESCRIPTIONS = {
    400: "The request body cannot be read: broken JSON or multipart, or an empty or broken image",
    404: "No such image in the index, or it can no longer be read",
    409: "The model cannot do this (no attention map: the image tower is not a ViT; rerank without a re-ranker "
    "or without a text)",
    413: "The request body or the image is too large",
    415: "The upload is not an image of a supported type",
    422: "A parameter breaks the schema or the query syntax",
    503: "Too many uploads, classifications or attention maps at once: retry after the Retry-After seconds",
}


class ErrorBody(BaseModel):
    """Every error answer: one line that says what was wrong and what to do."""

    error: str = Field(description="what was wrong, in one line")


def errors(*statuses: int) -> dict[int | str, dict]:
    """The ``responses=`` entries of a route that can answer these error statuses."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


def parse_labels(labels: str) -> list[str] | None:
    """The distinct names of a ``labels`` field, in order, or None if it breaks ``LABELS_PATTERN``."""
    if not _LABELS_RE.fullmatch(labels):
        return None
    return list(dict.fromkeys(name.strip(" \t\n\r") for name in labels.split(",") if name.strip(" \t\n\r")))


def allowed_methods(app: FastAPI, scope: Scope) -> str:
    """The ``Allow`` header for a 405 on ``scope``'s path: the methods of every route of that path."""
    methods: set[str] = set()
    for route in app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(scope)[0] is not Match.NONE:
            methods |= route_methods
    return ", ".join(sorted(methods))


def refine_openapi(app: FastAPI, *, one_of: dict[tuple[str, str], list[str]]) -> None:
    """Wrap ``app.openapi`` so that the schema it serves says what FastAPI leaves out (see the module doc).

    ``one_of`` maps (path, method) of a multipart route to the fields of which exactly one must be sent.
    """
    generate: Callable[[], dict] = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # caches itself in app.openapi_schema; refined in place, once
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
                if form is not None:
                    _refine_form(form, schema, one_of.get((path, method), []))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _refine_form(form: dict, schema: dict, one_of: list[str]) -> None:
    body = _resolve(form["schema"], schema)
    for name, field in body.get("properties", {}).items():
        branches = field.get("anyOf")
        if branches is not None:  # a multipart field is absent or a value: drop the "null" branch
            kept = [branch for branch in branches if branch.get("type") != "null"]
            field.pop("anyOf")
            field.update(kept[0] if len(kept) == 1 else {"anyOf": kept})
        if field.get("contentMediaType") == "application/octet-stream" or field.get("format") == "binary":
            form.setdefault("encoding", {})[name] = {"contentType": ", ".join(UPLOAD_TYPES)}
    if one_of:
        body["oneOf"] = [{"required": [name]} for name in one_of]


def _resolve(node: dict, schema: dict) -> dict:
    """``node`` itself, or the component its ``$ref`` names."""
    ref = node.get("$ref")
    if ref is None:
        return node
    found = schema
    for part in ref.removeprefix("#/").split("/"):
        found = found[part]
    return found
