"""Tool calls for Gemma 3n, valid by construction: the declared tools (OpenAI dicts or Python
functions), the grammar a reply is generated under, and the calls read back out of it.

The call syntax is the JSON variant of Google's function-calling guide for Gemma
(ai.google.dev/gemma/docs/capabilities/function-calling): one object per call,
`{"name": function name, "parameters": {argument: value, ...}}`, one per line when several. JSON
rather than the guide's Python-style `[f(a=1)]`: the arguments are then checked against the whole
JSON schema by one grammar (types, required, enum, nesting, bounds, `$defs`), and OpenAI's
`arguments` string is exactly the text the model wrote, so nothing is translated on the way.
A reply under "auto" is either text (its first character is not "{") or calls; one that starts a
call finishes it under the grammar.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
import uuid
from dataclasses import dataclass

from ..errors import ParameterError

MAX_TOOLS = 128
MAX_TOOLS_BYTES = 1 << 20
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
PYTHON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}
NO_PARAMETERS = {"type": "object", "properties": {}}
TEXT = r"/[^{](.|\n)*/"  # a reply that does not start a call


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema of an object

    def declaration(self) -> dict:
        """As the prompt shows it (the guide's function definitions)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def openai(self) -> dict:
        return {"type": "function", "function": self.declaration()}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto", "none", "required" or "function"
    name: str | None = None  # the function of mode "function"


def read_tools(tools, param: str = "tools") -> tuple[Tool, ...]:
    """OpenAI `tools` (dicts of type function) or Python functions, checked."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ParameterError(f"'{param}' must be a non-empty list of tools", param)
    if len(tools) > MAX_TOOLS:
        raise ParameterError(f"'{param}' takes at most {MAX_TOOLS} tools, got {len(tools)}", param)
    read = tuple(tool_from_function(t, f"{param}[{i}]") if callable(t) else tool_from_dict(t, f"{param}[{i}]")
                 for i, t in enumerate(tools))
    if len(json.dumps([t.declaration() for t in read])) > MAX_TOOLS_BYTES:
        raise ParameterError(f"'{param}' is over {MAX_TOOLS_BYTES} bytes", param)
    names = [t.name for t in read]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ParameterError(f"two tools are named '{name}'", f"{param}[{i}].function.name")
    return read


def tool_from_dict(tool, param: str) -> Tool:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ParameterError(f"{param} must be {{\"type\": \"function\", \"function\": {{...}}}}", param)
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ParameterError(f"{param}.function.name must be 1-64 letters, digits, '_' or '-'", f"{param}.function.name")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise ParameterError(f"{param}.function.description must be a string", f"{param}.function.description")
    parameters = function.get("parameters", NO_PARAMETERS)
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ParameterError(f"{param}.function.parameters must be a JSON schema of an object", f"{param}.function.parameters")
    return Tool(name, description, parameters)


def tool_from_function(function, param: str) -> Tool:
    """A Python function's tool: its name, its docstring's summary, and a schema from its type hints
    (str, int, float, bool, list[...], dict, Literal[...], Optional / `X | None`); parameters
    without a default are required. A Google-style "Args:" section describes the parameters."""
    name = getattr(function, "__name__", "")
    if not NAME.fullmatch(name):
        raise ParameterError(f"{param}: the function's name '{name}' is not a valid tool name", param)
    doc = inspect.getdoc(function) or ""
    summary, notes = doc.split("\n\n", 1)[0].replace("\n", " ").strip(), argument_notes(doc)
    try:
        hints = typing.get_type_hints(function)
    except Exception as exc:  # unresolvable annotations
        raise ParameterError(f"{param}: cannot read {name}'s type hints ({exc})", param) from None
    properties, required = {}, []
    for argument in inspect.signature(function).parameters.values():
        if argument.kind in (argument.VAR_POSITIONAL, argument.VAR_KEYWORD):
            raise ParameterError(f"{param}: {name}(*{argument.name}) has no fixed parameters to declare", param)
        if argument.name not in hints:
            raise ParameterError(f"{param}: {name}'s parameter '{argument.name}' has no type hint", param)
        schema = type_schema(hints[argument.name], f"{param}: {name}'s parameter '{argument.name}'", param)
        if argument.name in notes:
            schema["description"] = notes[argument.name]
        properties[argument.name] = schema
        if argument.default is argument.empty:
            required.append(argument.name)
    parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return Tool(name, summary, parameters)


def argument_notes(doc: str) -> dict[str, str]:
    """{parameter: description} from a Google-style "Args:" section."""
    match = re.search(r"^(?:Args|Arguments|Parameters):\n((?:[ \t]+.*\n?)+)", doc, re.M)
    notes = {}
    for line in (match.group(1).splitlines() if match else []):
        entry = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line)
        if entry:
            notes[entry.group(1)] = entry.group(2).strip()
    return notes


def type_schema(hint, where: str, param: str) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in PYTHON_TYPES:
        return {"type": PYTHON_TYPES[hint]}
    if origin is typing.Literal and all(isinstance(a, (str, int, float, bool)) for a in args):
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        if len(kept) == 1:
            return {"anyOf": [type_schema(kept[0], where, param), {"type": "null"}]}
    if origin is list and len(args) == 1:
        return {"type": "array", "items": type_schema(args[0], where, param)}
    if origin is dict and (not args or args[0] is str):
        return {"type": "object"}
    raise ParameterError(f"{where}: type {hint!r} has no JSON schema here (use str, int, float, bool, list, dict, Literal)", param)


def read_tool_choice(value, tools: tuple[Tool, ...], param: str = "tool_choice") -> ToolChoice:
    if value is None or value in ("auto", "none", "required"):
        return ToolChoice(value or "auto")
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ParameterError(f"'{param}' must be auto, none, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", param)
    if name not in {t.name for t in tools}:
        raise ParameterError(f"'{param}' names '{name}', which is not among the tools", f"{param}.function.name")
    return ToolChoice("function", name)


def call_schema(tools: tuple[Tool, ...]) -> dict:
    """One call of any of `tools`: {"name": its name, "parameters": valid against its schema}. Each
    tool's `$defs` move to the top, renamed per tool, so its `#/$defs/...` refs still resolve. An
    object schema that lists properties and says nothing of others takes no others (a function
    takes the arguments it declares; an open object lets a model write keys until max_tokens)."""
    variants, definitions = [], {}
    for index, tool in enumerate(tools):
        parameters = dict(tool.parameters)
        for key in ("$defs", "definitions"):
            for def_name, schema in parameters.pop(key, {}).items():
                definitions[f"t{index}_{def_name}"] = closed(renamed_refs(schema, index))
        variants.append({
            "type": "object",
            "properties": {"name": {"const": tool.name}, "parameters": closed(renamed_refs(parameters, index))},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "$defs": definitions} if definitions else schema


def closed(schema):
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [closed(value) for value in schema]
    return schema


def renamed_refs(schema, index: int):
    if isinstance(schema, dict):
        return {k: (re.sub(r"^#/(\$defs|definitions)/", f"#/$defs/t{index}_", v) if k == "$ref" and isinstance(v, str)
                    else renamed_refs(v, index)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [renamed_refs(v, index) for v in schema]
    return schema


def tool_grammar(grammars, tools: tuple[Tool, ...], choice: ToolChoice, parallel: bool = True) -> str | None:
    """The llguidance grammar of a reply (None: "none", nothing constrained)."""
    from .grammar import compact

    if choice.mode == "none":
        return None
    callable_tools = tuple(t for t in tools if choice.mode != "function" or t.name == choice.name)
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = f"calls | {TEXT}" if choice.mode == "auto" else "calls"
    source = f"start: {start}\ncalls: {calls}\ncall: %json {json.dumps(compact(call_schema(callable_tools)))}\n"
    return grammars.lark(source, "tools")


def call_prefix(name: str) -> str:
    """A call's text up to its arguments (the grammar's compact separators)."""
    return f'{{"name": {json.dumps(name)}, "parameters": '


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, OpenAI tool calls) of a reply made under a tool grammar: the text when it is not
    calls; calls cut short (max_tokens) are left out."""
    if not text.startswith("{"):
        return text, []
    calls = []
    for line in text.split("\n"):
        try:
            call = json.loads(line)
        except json.JSONDecodeError:
            continue
        calls.append(openai_call(call["name"], line[len(call_prefix(call["name"])) : -1]))
    return None, calls


def openai_call(name: str, arguments: str, call_id: str | None = None) -> dict:
    return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


class CallStream:
    """Turns a reply's text, as it streams, into OpenAI's tool-call deltas: each call's index, id,
    type and name once its name is complete, then its arguments in fragments (one character is held
    back: the call's closing brace ends the line)."""

    NAME_PREFIX = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "parameters": ')

    def __init__(self):
        self.decided, self.calls = False, False  # whether the reply is calls, once its first text came
        self.line, self.sent, self.index = "", 0, -1  # the current call's text, how much of it went out
        self.completed = 0  # calls whose text is whole

    def add(self, text: str) -> tuple[str, list[dict]]:
        """(content text, tool-call deltas) that `text` adds."""
        if not self.decided and text:
            self.decided, self.calls = True, text.startswith("{")
        if not self.calls:
            return text, []
        deltas = []
        for piece in re.split(r"(\n)", text):
            if piece == "\n":
                deltas += self.finish_line()
            elif piece:
                self.line += piece
                deltas += self.progress(hold=1)
        return "", deltas

    def flush(self) -> list[dict]:
        return self.finish_line() if self.calls else []

    def progress(self, hold: int) -> list[dict]:
        deltas = []
        if self.sent == 0:
            match = self.NAME_PREFIX.match(self.line)
            if not match:
                return []
            self.index += 1
            self.sent = match.end()
            call = openai_call(json.loads(match.group(1)), "")
            deltas.append({"index": self.index, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}})
        fragment = self.line[self.sent : len(self.line) - hold]
        if fragment:
            deltas.append({"index": self.index, "function": {"arguments": fragment}})
            self.sent += len(fragment)
        return deltas

    def finish_line(self) -> list[dict]:
        try:
            json.loads(self.line)
            complete = True
        except json.JSONDecodeError:  # cut short by max_tokens
            complete = False
        deltas = self.progress(hold=1) if complete else []
        self.completed += complete
        self.line, self.sent = "", 0
        return deltas
