"""Strict parsing of JSON request bodies: what the standard library's `json.loads` would crash
on becomes a 400 `Failed to parse the request body as JSON: ...`, as TGI (serde_json) answers a
body that is not JSON:

- nesting deeper than MAX_DEPTH (the C parser would raise RecursionError);
- integers longer than Python's digit limit (ValueError outside JSONDecodeError);
- strings holding lone surrogates (`"\\ud800"`: not Unicode; the tokenizer rejects them).

NaN and Infinity (not JSON, accepted by Python) parse, and every float field of the schemas
refuses them with a 422, as it does 1e400; in a field that is ignored they do no harm.
Our views' blueprints (`StrictBlueprint`) parse their `arguments` with BodyParser.
"""
from __future__ import annotations

import json
import re

import flask_smorest
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import RequestEntityTooLarge

MAX_DEPTH = 64  # TGI's bodies are 3 levels deep; grammar values a few more
_OPENERS = re.compile(rb"[\[{]")


def parse_body(raw: bytes):
    """The parsed body; json.JSONDecodeError (a ValueError) for anything we refuse."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"Bytes decoding error : {exc.reason}", doc=repr(raw[:64]), pos=exc.start) from exc
    if len(_OPENERS.findall(raw)) > MAX_DEPTH and _depth(raw) > MAX_DEPTH:
        raise json.JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", doc=text[:64], pos=0)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:  # integer digit limit
        raise json.JSONDecodeError(str(exc), doc=text[:64], pos=0) from exc
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise json.JSONDecodeError("a string holds a lone surrogate (not valid Unicode)", doc=text[:64], pos=0) from exc
    return data


def _depth(raw: bytes) -> int:
    """Nesting depth of brackets outside strings (run only on bodies with many brackets)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


class BodyParser(FlaskParser):
    def _raw_load_json(self, req):
        if not is_json_request(req):
            return core.missing
        raw = req.get_data(cache=True)  # 413 past MAX_CONTENT_LENGTH
        _check_chunked_size(req, raw)
        if not raw:
            raise json.JSONDecodeError("empty body", doc="", pos=0)  # webargs: the body is missing
        return parse_body(raw)


def _check_chunked_size(req, raw: bytes) -> None:
    """A chunked body (no Content-Length) is cut at the limit by werkzeug, not refused: refuse it
    when the server's stream still holds more."""
    limit = req.max_content_length
    if req.content_length is None and limit is not None and len(raw) >= limit:
        if req.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()


class StrictBlueprint(flask_smorest.Blueprint):
    """A flask-smorest blueprint whose `arguments` parse bodies with BodyParser."""

    ARGUMENTS_PARSER = BodyParser()
