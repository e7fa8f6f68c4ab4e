"""TGI's `grammar` parameter, checked at the edge so that a bad one is a 422, not a failed job.

Shapes: `{"type": "json", "value": <JSON schema, or its JSON text; {} for any JSON>}` (alias
`json_object`), `{"type": "json_schema", "value": {"name": ..., "schema": <JSON schema>}}` and
`{"type": "regex", "value": "<pattern>"}`. A schema is checked against its metaschema
(jsonschema), then the grammar is built by the same library the replicas decode with
(llguidance: a Rust extension, no torch), which also rejects what it cannot enforce (look-around
in a regex, unknown `$ref`s, ...). The job carries `{"type": "json" | "regex", "value": ...}`.
"""
from __future__ import annotations

import json

import jsonschema
import llguidance

from web.errors import ValidationError

MAX_MESSAGE = 300  # characters of the library's explanation kept in the error


def check_grammar(grammar: dict | None) -> dict | None:
    """The grammar as the job carries it, or ValidationError("grammar is not valid: ...")."""
    if grammar is None:
        return None
    kind, value = grammar["type"], grammar["value"]
    if kind == "regex":
        if not isinstance(value, str):
            _invalid("a regex grammar's value must be a string")
        _check_buildable(llguidance.LLMatcher.grammar_from_regex, value)
        return {"type": "regex", "value": value}
    if kind == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            _invalid('a json_schema grammar\'s value must be {"name": ..., "schema": <JSON schema>}')
        value = value["schema"]
    schema = _schema(value)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        _invalid(error.message)
    _check_buildable(llguidance.LLMatcher.grammar_from_json_schema, schema)
    return {"type": "json", "value": schema}


def _schema(value) -> dict:
    """A JSON schema object, given as one or as its JSON text (TGI accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            _invalid(f"the JSON schema is not valid JSON: {error}")
    if not isinstance(value, dict):
        _invalid("a json grammar's value must be a JSON schema object")
    return value


def _check_buildable(build, value) -> None:
    try:
        error = llguidance.LLMatcher.validate_grammar(build(value))
    except ValueError as raised:
        error = str(raised)
    if error:
        _invalid(error)


def _invalid(reason: str):
    reason = " ".join(reason.split())  # the library's messages span lines
    if len(reason) > MAX_MESSAGE:
        reason = reason[: MAX_MESSAGE - 3] + "..."
    raise ValidationError(f"grammar is not valid: {reason}", param="grammar")
