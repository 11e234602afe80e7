"""What the model reads in a chat with tools, following Google's function-calling guide for Gemma:
the guide's JSON preamble and the functions' declarations open the first user turn (as a system
message, which Gemma's template puts there), the assistant's earlier calls are shown as the lines the
model writes, and the results of consecutive `tool` messages form one user turn wrapped in
```tool_output``` (as the guide hands results back). Gemma's template has no tool role and wants user
and assistant turns to alternate, so adjacent user turns are merged.

A checkpoint whose chat template handles tools itself (it mentions `tools`) gets the messages and
the declarations unchanged instead.
"""

from __future__ import annotations

import json

from ..errors import ParameterError
from .constraints import Constraints
from .tools import Tool, ToolChoice

PREAMBLE = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n'
    "You SHOULD NOT include any other text in the response if you call a function\n"
)
SEVERAL_CALLS = "To call several functions, write one such object per line.\n"


def template_handles_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tools_preamble(tools: tuple[Tool, ...], parallel: bool) -> str:
    declarations = json.dumps([tool.declaration() for tool in tools], indent=2, ensure_ascii=False)
    return PREAMBLE + (SEVERAL_CALLS if parallel else "") + declarations


def call_line(call: dict, param: str) -> str:
    """An OpenAI tool call as the model writes it."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ParameterError(f"{param}.function.name must be a non-empty string", f"{param}.function.name")
    arguments = function.get("arguments", "{}")
    try:
        parameters = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        parameters = None
    if not isinstance(parameters, dict):
        raise ParameterError(f"{param}.function.arguments must be a JSON object (as a string)", f"{param}.function.arguments")
    return json.dumps({"name": name, "parameters": parameters}, ensure_ascii=False)


def text_of(content, param: str) -> str:
    """A tool result's or an assistant turn's text: a string or text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(part["text"] for part in content)
    raise ParameterError(f"{param} must be a string or a list of text parts", param)


def results_turn(results: list[str]) -> dict:
    return {"role": "user", "content": "```tool_output\n" + "\n".join(results) + "\n```"}


def merged(messages: list[dict]) -> list[dict]:
    """Adjacent turns of one role joined (text by a blank line, parts kept in order)."""
    out = []
    for message in messages:
        if out and out[-1]["role"] == message["role"] and message["role"] != "system":
            before, after = out[-1]["content"], message["content"]
            if isinstance(before, str) and isinstance(after, str):
                content = f"{before}\n\n{after}"
            else:
                content = as_parts(before) + [{"type": "text", "text": "\n\n"}] + as_parts(after)
            out[-1] = {"role": message["role"], "content": content}
        else:
            out.append(dict(message))
    return out


def as_parts(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def with_system_text(messages: list[dict], text: str) -> list[dict]:
    """`text` first in the system message (one is made when there is none)."""
    if messages and messages[0]["role"] == "system":
        content = messages[0]["content"]
        joined = f"{text}\n\n{content}" if isinstance(content, str) else [{"type": "text", "text": f"{text}\n\n"}, *content]
        return [{"role": "system", "content": joined}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tool_messages(messages: list[dict], tools: tuple[Tool, ...], choice: ToolChoice | None, parallel: bool = True,
                  param: str = "messages") -> list[dict]:
    """HF-format chat messages with OpenAI's tool turns (assistant `tool_calls`, `role: "tool"` with
    `tool_call_id`) -> messages of the roles Gemma's template takes, as described above. Each tool
    message must answer a call made earlier in the chat."""
    calls: dict[str, str] = {}  # id -> function name, of the calls made so far
    out, results = [], []
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ParameterError(f"{where}.tool_call_id must name the call this message answers", f"{where}.tool_call_id")
            if call_id not in calls:
                raise ParameterError(f"{where}.tool_call_id '{call_id}' answers no earlier tool call", f"{where}.tool_call_id")
            result = text_of(message.get("content"), f"{where}.content")
            results.append(json.dumps({"name": calls[call_id], "result": result}, ensure_ascii=False))
            continue
        if results:
            out.append(results_turn(results))
            results = []
        tool_calls = message.get("tool_calls")
        if tool_calls is None:
            out.append({key: value for key, value in message.items() if key in ("role", "content")})
            continue
        if role != "assistant" or not isinstance(tool_calls, list) or not tool_calls:
            raise ParameterError(f"{where}.tool_calls must be a non-empty list, on an assistant message", f"{where}.tool_calls")
        lines = []
        for j, call in enumerate(tool_calls):
            lines.append(call_line(call, f"{where}.tool_calls[{j}]"))
            if isinstance(call.get("id"), str):
                calls[call["id"]] = call["function"]["name"]
        text = text_of(message.get("content"), f"{where}.content")
        out.append({"role": "assistant", "content": (text + "\n" if text else "") + "\n".join(lines)})
    if results:
        out.append(results_turn(results))
    if tools and choice is not None and choice.mode != "none":
        out = with_system_text(out, tools_preamble(tools, parallel))
    return merged(out)


def prepare_chat(processor, messages: list[dict], constraints: Constraints, param: str = "messages"):
    """The processor's Prompt of a chat under `constraints` (its tools, rendered as above)."""
    if template_handles_tools(processor.chat_template):
        return processor.prepare(messages, tools=[tool.openai() for tool in constraints.tools] if constraints.calls else None)
    return processor.prepare(tool_messages(messages, constraints.tools, constraints.choice, constraints.parallel, param))
