"""A request's constraints on its reply, read the same way for the Python API, the CLI and the server:
OpenAI's `tools`, `tool_choice`, `parallel_tool_calls` and `response_format`, checked, and the one
llguidance grammar the reply is generated under (None: free decoding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ParameterError
from .tools import Tool, ToolChoice, read_tool_choice, read_tools, tool_grammar


@dataclass(frozen=True)
class Constraints:
    tools: tuple[Tool, ...] = ()
    choice: ToolChoice | None = None  # None: no tools were given
    parallel: bool = True
    grammar: str | None = None

    @property
    def calls(self) -> bool:
        """Whether the reply is read for tool calls."""
        return bool(self.tools) and self.choice.mode != "none"


def read_constraints(grammars: Callable[[], object], tools=None, tool_choice=None, parallel_tool_calls=None,
                     response_format=None) -> Constraints:
    """`grammars()` gives the tokenizer's `grammar.Grammars` (or raises why there is none); it is only
    called when a grammar is needed."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ParameterError("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise ParameterError("'tool_choice' needs 'tools'", "tool_choice")
        return Constraints(grammar=format_grammar(grammars, response_format))
    declared = read_tools(tools)
    choice = read_tool_choice(tool_choice, declared)
    if choice.mode == "none":
        return Constraints(declared, choice, parallel, format_grammar(grammars, response_format))
    if format_kind(response_format) != "text":
        raise ParameterError("'response_format' cannot constrain a reply that may call tools (use tool_choice none)", "response_format")
    return Constraints(declared, choice, parallel, tool_grammar(grammars(), declared, choice, parallel))


def format_kind(response_format) -> str:
    if response_format is None:
        return "text"
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise ParameterError("'response_format.type' must be text, json_object or json_schema", "response_format.type")
    return kind


def format_grammar(grammars: Callable[[], object], response_format) -> str | None:
    kind = format_kind(response_format)
    if kind == "text":
        return None
    if kind == "json_object":
        return grammars().json_object()
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ParameterError("'response_format.json_schema.schema' must be a JSON schema object", "response_format.json_schema.schema")
    return grammars().json_schema(schema, "response_format.json_schema.schema")
