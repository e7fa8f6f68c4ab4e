"""Structured output on /v1/chat/completions: `response_format`, `tools` and `tool_choice` turned
into TGI's `grammar` (checked next by `web.grammar`, as on /generate) and into what the chat
template sees.

Tool calls follow TGI: the output is constrained to `{"name": <a function's name, as a const>,
"arguments": <that function's parameters schema>}`, an `anyOf` over the allowed functions. With
`tool_choice: "auto"` one more alternative, `no_tool`, lets the model answer in text
(`{"name": "no_tool", "arguments": {"content": "..."}}`), which is returned as plain content.
`web.openai.tool_calls` turns that output back into OpenAI's `tool_calls`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from web.errors import ValidationError

NO_TOOL = "no_tool"
NO_TOOL_PARAMETERS = {
    "type": "object",
    "properties": {"content": {"type": "string", "description": "The answer, when no function fits."}},
    "required": ["content"],
    "additionalProperties": False,
}
NO_TOOL_FUNCTION = {"name": NO_TOOL, "description": "Answer in text, when no function is needed (any more).",
                    "parameters": NO_TOOL_PARAMETERS}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# TGI's default, appended to the last message when the template does not render `tools` itself.
DEFAULT_TOOL_PROMPT = ("Given the functions available, please respond with a JSON for a function call with its "
                       "proper arguments that best answers the given prompt. Respond in the format "
                       "{name: function name, arguments: dictionary of argument name and its value}. "
                       "Do not use variables.")
CHOICE_KEYWORDS = ("none", "auto", "required")
_DEFS_KEYS = ("$defs", "definitions")


@dataclass(frozen=True)
class StructuredOutput:
    grammar: dict | None = None  # TGI's `grammar`, for web.validation
    tools: list[dict] | None = None  # for the chat template (None: it sees no tools)
    listed: list[dict] | None = None  # the functions a template without tools is shown (no_tool too)
    tool_calls: bool = False  # the output is a tool call (or no_tool) JSON
    names: tuple[str, ...] = ()  # the functions the output may name (no_tool included)


def structured_output(body: dict) -> StructuredOutput:
    """Raise ValidationError (422) on a malformed `response_format`, `tools` or `tool_choice`
    (or their legacy forms, `functions` and `function_call`)."""
    fmt = response_format_grammar(body.get("response_format"))
    legacy = bool(body.get("functions")) and not body.get("tools")
    tools = _checked_tools(_legacy_tools(body["functions"]) if legacy else body.get("tools"))
    choice = _legacy_choice(body.get("function_call")) if legacy else body.get("tool_choice")
    functions = _chosen_functions(tools, choice)
    if functions is None:
        return StructuredOutput(grammar=fmt)
    if fmt is not None:
        raise ValidationError("`response_format` cannot be used with `tools` (unless `tool_choice` is \"none\")",
                              param="response_format")
    return StructuredOutput(grammar={"type": "json", "value": tool_call_schema(functions)}, tools=tools,
                            listed=functions, tool_calls=True, names=tuple(f["name"] for f in functions))


def _legacy_tools(functions: list) -> list:
    """OpenAI's deprecated `functions`: each one a tool."""
    return [{"type": "function", "function": f} for f in functions]


def _legacy_choice(function_call):
    """`function_call`: "none", "auto" or {"name": ...}, as a `tool_choice`."""
    if isinstance(function_call, dict) and "name" in function_call:
        return {"type": "function", "function": {"name": function_call["name"]}}
    return function_call


def response_format_grammar(fmt: dict | None) -> dict | None:
    """OpenAI's `text`, `json_object`, `json_schema` and TGI's `json`/`json_object`/`regex` with a
    `value`, as TGI's grammar (or None for text)."""
    if not fmt or fmt.get("type") == "text":
        return None
    kind = fmt.get("type")
    if "value" in fmt and kind in ("json", "json_object", "json_schema", "regex"):
        return {"type": kind, "value": fmt["value"]}  # TGI's shape
    if kind == "json_object":
        return {"type": "json", "value": {"type": "object"}}  # OpenAI's JSON mode: an object
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ValidationError('grammar is not valid: `response_format` json_schema needs '
                                  '"json_schema": {"name": ..., "schema": <JSON schema>}', param="response_format")
        return {"type": "json", "value": spec.get("schema") if spec.get("schema") is not None else {}}
    raise ValidationError(f"`response_format` type must be one of text, json_object, json_schema, json, regex. "
                          f"Given: {str(kind)[:32]!r}", param="response_format")


def tool_call_schema(functions: list[dict]) -> dict:
    """The output: {"name": <const>, "arguments": <parameters>}, one alternative per function;
    the functions' `$defs` are lifted to the root, where their `$ref`s point."""
    defs: dict = {key: {} for key in _DEFS_KEYS}
    alternatives = [_call_alternative(f, defs) for f in functions]
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    return {**schema, **{key: value for key, value in defs.items() if value}}


def template_tools(functions: list[dict] | None, prompt: str | None, messages: list[dict],
                   accepts_tools: bool) -> list[dict]:
    """The messages the template renders: when it does not render `tools` itself, the functions
    the output may name (`no_tool` too, so the model knows it may answer in text) and the tool
    prompt go at the end of the last message, as TGI does, so that the model sees them."""
    if accepts_tools or not functions or not messages:
        return messages
    last = dict(messages[-1])
    listing = json.dumps(functions)
    last["content"] = f"{last.get('content') or ''}\n---\n{prompt or DEFAULT_TOOL_PROMPT}\n{listing}"
    return [*messages[:-1], last]


def _call_alternative(function: dict, defs: dict) -> dict:
    parameters = function.get("parameters")
    parameters = dict(parameters) if parameters else dict(NO_PARAMETERS)
    for key in _DEFS_KEYS:
        for name, definition in (parameters.pop(key, None) or {}).items():
            if defs[key].setdefault(name, definition) != definition:
                raise ValidationError(f"functions define `{key}` entry {name[:32]!r} differently", param="tools")
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def _checked_tools(tools) -> list[dict]:
    if not tools:
        return []
    names = set()
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function" \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValidationError('`tools` entries must be {"type": "function", "function": {"name": ..., '
                                  '"description": ..., "parameters": <JSON schema>}}', param="tools")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise ValidationError(f"the parameters of function {function['name'][:32]!r} must be a JSON schema object",
                                  param="tools")
        if function["name"] in names or function["name"] == NO_TOOL:
            raise ValidationError(f"function name {function['name'][:32]!r} is used twice or reserved", param="tools")
        names.add(function["name"])
    return tools


def _chosen_functions(tools: list[dict], choice) -> list[dict] | None:
    """The functions the output may call (with `no_tool` for auto), or None: no tool grammar."""
    functions = [t["function"] for t in tools]
    name = _named_choice(choice)
    if name is not None:
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise ValidationError(f"`tool_choice` names function {name[:32]!r}, which is not in `tools`",
                                  param="tool_choice")
        return chosen
    choice = "auto" if choice is None else choice
    if choice == "required" and not functions:
        raise ValidationError('`tool_choice` is "required" but no `tools` were given', param="tool_choice")
    if choice == "none" or not functions:
        return None
    if choice == "auto":
        return [*functions, NO_TOOL_FUNCTION]
    return functions


def _named_choice(choice) -> str | None:
    """The function a `tool_choice` names: OpenAI's {"type": "function", "function": {"name"}},
    or TGI's bare name; None for the keywords."""
    if isinstance(choice, str):
        return None if choice in CHOICE_KEYWORDS else choice
    if choice is None:
        return None
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValidationError('`tool_choice` must be "none", "auto", "required" or '
                              '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    return function["name"]
