"""Schemathesis hooks for vitrina's API: real pictures for uploads, and multipart bodies judged as sent.

1. The schema says an upload is one of the image types in ``vitrina.serve.contract.UPLOAD_TYPES``
   (``encoding.contentType`` of the multipart field); schemathesis cannot draw a valid image by
   itself, so the strategies here make small PNG, JPEG, GIF and WebP files of random size and colour.
2. Schemathesis (4.32) misjudges some multipart bodies, in two ways this hook corrects by reading
   the body that was actually sent, as the server reads it, and validating that against the schema:
   - a text field mutated to another type (an object, a number) goes on the wire as text that the
     schema accepts; schemathesis means to check this, but fails to when a file part is present
     (its validator rejects the file's ``bytes``), and reports "schema-violating request accepted";
   - the coverage phase fills a required text field with ``""`` beside an encoded file part whatever
     the field's pattern, and reports the 422 as "schema-valid request rejected".
   Every other failure is kept.

Imported by ``test_api_contract.py``; for the command line against a served index::

    PYTHONPATH=tests SCHEMATHESIS_HOOKS=schemathesis_hooks \
        schemathesis run http://127.0.0.1:8000/openapi.json --checks all
"""

from __future__ import annotations

import io
import re
from email.parser import BytesParser
from email.policy import HTTP

import jsonschema_rs
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.openapi.checks import RejectedPositiveData

_PIL_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP"}


def _picture(width: int, height: int, colour: tuple[int, int, int], pil_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=pil_format)
    return buffer.getvalue()


def _pictures(pil_format: str) -> st.SearchStrategy[bytes]:
    side = st.integers(min_value=1, max_value=64)
    colour = st.tuples(*[st.integers(min_value=0, max_value=255)] * 3)
    return st.builds(_picture, side, side, colour, st.just(pil_format))


for _media_type, _pil_format in _PIL_FORMATS.items():
    schemathesis.openapi.media_type(_media_type, _pictures(_pil_format))


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep a failure unless it is one of the two multipart misjudgements of the module docstring."""
    if case.media_type != "multipart/form-data" or not isinstance(failure, AcceptedNegativeData | RejectedPositiveData):
        return True
    valid = _valid_as_sent(case, response)
    if valid is None:
        return True
    return valid if isinstance(failure, RejectedPositiveData) else not valid


def _valid_as_sent(case, response) -> bool | None:
    """Whether the multipart body sent satisfies the operation's schema; None if it cannot tell."""
    operation = case.operation.schema.raw_schema["paths"][case.operation.path][case.method.lower()]
    body_schema = _resolve(operation["requestBody"]["content"]["multipart/form-data"]["schema"], case)
    content, headers = response.request.body, response.request.headers
    if not isinstance(content, bytes):
        return None
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + content)
    properties = body_schema.get("properties", {})
    sent: dict[str, object] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name not in properties:
            continue  # undeclared fields are ignored by the server and allowed by the schema
        if part.get_filename() is not None or "content-type" in part:
            sent[name] = ""  # a file: the schema only says "a string of bytes"
            continue
        text = part.get_payload(decode=True).decode(errors="replace")
        integer = properties[name].get("type") == "integer" and re.fullmatch(r"[+-]?[0-9]+", text.strip())
        sent[name] = int(text) if integer else text  # the last of repeated parts wins, as in the server
    return jsonschema_rs.validator_for(body_schema).is_valid(sent)


def _resolve(node: dict, case) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    found = case.operation.schema.raw_schema
    for part in ref.removeprefix("#/").split("/"):
        found = found[part]
    return found
