"""Tool calls: the declared tools (OpenAI dicts, Python functions), what the model reads, the grammar
that makes every call valid (checked with the `jsonschema` package over many seeds at temperature 1,
on the tiny checkpoint, whose random weights would never write a valid call by themselves), the
server through the real `openai` client (calls whole and streamed, the history, batching with other
rows, each bad input's 400), and the Python API and the CLI giving the server's calls."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import pytest
from openai import OpenAI

from mlx_gemma3n.decoding.grammar import BUILT, Grammars
from mlx_gemma3n.decoding.tool_prompt import tool_messages
from mlx_gemma3n.decoding.tools import CallStream, ToolChoice, call_schema, parse_calls, read_tools
from mlx_gemma3n.errors import Gemma3nError, ParameterError
from mlx_gemma3n.generate import Reply, generate, stream_generate
from mlx_gemma3n.inputs.processor import Processor

from helpers import running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    }, "required": ["city", "unit"]},
}}
BOOKING = {"type": "function", "function": {
    "name": "book",
    "parameters": {"type": "object", "properties": {
        "guests": {"type": "array", "items": {"$ref": "#/$defs/guest"}, "minItems": 1, "maxItems": 2},
        "confirm": {"type": "boolean"},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
    }, "required": ["guests", "confirm"], "$defs": {
        "guest": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99},
                                                     "seat": {"enum": ["a", "b"]}}, "required": ["age"]},
    }},
}}
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time now"}}
TOOLS = [WEATHER, BOOKING, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {}}) for t in TOOLS}
NAMED = {"type": "function", "function": {"name": "book"}}


def check_call(call: dict, allowed=None) -> None:
    """A call OpenAI's client would read: its id and type, a declared name, arguments valid JSON
    against the function's own schema."""
    assert call["id"].startswith("call_") and call["type"] == "function"
    name = call["function"]["name"]
    assert name in (allowed or SCHEMAS)
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


# --- tools and their schemas ------------------------------------------------------------------


def forecast(city: str, days: int = 3, unit: Literal["c", "f"] = "c", hourly: bool | None = None, tags: list[str] | None = None) -> str:
    """Tell the weather.

    Args:
        city: where
        days (int): how many days ahead
    """
    return "sun"


def test_a_python_function_declares_its_schema_from_hints_and_docstring():
    (tool,) = read_tools([forecast])
    assert (tool.name, tool.description) == ("forecast", "Tell the weather.")
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "where"},
            "days": {"type": "integer", "description": "how many days ahead"},
            "unit": {"enum": ["c", "f"]},
            "hourly": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
            "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
        },
        "required": ["city"],
        "additionalProperties": False,
    }


def untyped(x):
    return x


BAD_TOOLS = [
    ("not a list", "tools"),
    ([], "tools"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "retrieval"}], "tools[0]"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], "tools"),
    ([{"type": "function", "function": {"name": "f", "description": "x" * (1 << 20)}}], "tools"),
    ([untyped], "tools[0]"),
]


@pytest.mark.parametrize("tools, param", BAD_TOOLS)
def test_bad_tools_name_the_parameter(tools, param):
    with pytest.raises(ParameterError) as error:
        read_tools(tools)
    assert error.value.param == param and "\n" not in str(error.value)


def test_call_schema_takes_each_tools_refs_along():
    schema = call_schema(read_tools(TOOLS))
    good = {"name": "book", "parameters": {"guests": [{"age": 3, "seat": "a"}], "confirm": True}}
    jsonschema.validate(good, schema)
    for bad in ({"name": "book", "parameters": {"guests": [{"age": 300}], "confirm": True}},
                {"name": "book", "parameters": {"guests": [], "confirm": True}},
                {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "kelvin"}},
                {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius", "extra": 1}},
                {"name": "nope", "parameters": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


# --- what the model reads --------------------------------------------------------------------


def test_history_renders_the_calls_and_their_results_as_the_guide_shows_them():
    tools = read_tools([CLOCK])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "clock", "arguments": '{"tz":"UTC"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "noon"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "12:00"}]},
        {"role": "user", "content": "Thanks"},
    ]
    declarations = json.dumps([{"name": "clock", "description": "The time now", "parameters": {"type": "object", "properties": {}}}], indent=2)
    assert tool_messages(messages, tools, ToolChoice("auto")) == [
        {"role": "system", "content": (
            "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format of\n"
            '{"name": function name, "parameters": dictionary of argument name and its value}\n'
            "You SHOULD NOT include any other text in the response if you call a function\n"
            "To call several functions, write one such object per line.\n" + declarations + "\n\nBe brief.")},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": '{"name": "clock", "parameters": {}}\n{"name": "clock", "parameters": {"tz": "UTC"}}'},
        {"role": "user", "content": '```tool_output\n{"name": "clock", "result": "noon"}\n{"name": "clock", "result": "12:00"}\n```\n\nThanks'},
    ]
    assert tool_messages(messages[1:2], tools, ToolChoice("none")) == messages[1:2]  # "none": no functions shown


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "tool_call_id": "c9", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "clock", "arguments": "{oops"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
])
def test_bad_history_names_the_message(messages, param):
    with pytest.raises(ParameterError) as error:
        tool_messages(messages, read_tools([CLOCK]), ToolChoice("auto"))
    assert error.value.param == param


def test_streamed_deltas_reassemble_into_the_calls_for_any_split():
    text = '{"name": "get_weather", "parameters": {"city": "O\\"slo\\n", "unit": "celsius"}}\n{"name": "clock", "parameters": {}}'
    _, calls = parse_calls(text)
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 30)))
        stream, deltas = CallStream(), []
        for piece in (text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])):
            content, new = stream.add(piece)
            assert content == ""
            deltas += new
        deltas += stream.flush()
        assert stream.completed == 2
        rebuilt = {}
        for delta in deltas:
            entry = rebuilt.setdefault(delta["index"], {"name": None, "arguments": ""})
            entry["name"] = delta["function"].get("name") or entry["name"]
            entry["arguments"] += delta["function"]["arguments"]
        assert [(e["name"], e["arguments"]) for _, e in sorted(rebuilt.items())] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


# --- the token table where llguidance's reader refuses the tokenizer --------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_ckpt_256):
    return tiny_ckpt_256.path


def test_a_metaspace_tokenizer_gets_the_table_llguidance_reads_from_the_same_vocabulary(checkpoint, tmp_path):
    import llguidance

    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "config.json"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    metaspace, plain = Processor(tmp_path), Processor(checkpoint)
    with pytest.raises(ValueError):
        llguidance.LLTokenizer(metaspace.tokenizer.to_str(), n_vocab=plain.vocab_size, eos_token=[1])
    ours = Grammars(metaspace, plain.vocab_size, {1, 106}).tokenizer
    theirs = Grammars(plain, plain.vocab_size, {1, 106}).tokenizer
    assert all(ours.is_special_token(token) for token in plain.special_token_ids)
    for token in range(plain.vocab_size):
        assert ours.is_special_token(token) == theirs.is_special_token(token), token
        assert ours.decode_bytes([token]) == theirs.decode_bytes([token]), token


def test_without_llguidance_asking_for_tools_says_what_to_install(tiny_256_loaded, monkeypatch):
    model, processor = tiny_256_loaded
    BUILT.pop(processor, None)
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(Gemma3nError, match="pip install llguidance"):
        generate(model, processor, "hi", 4, tools=[CLOCK])
    assert isinstance(generate(model, processor, "hi", 4, tools=[CLOCK], tool_choice="none"), Reply)  # no grammar needed


# --- every call validates, at temperature 1 ---------------------------------------------------

PROMPTS = ["What's the weather in Oslo?", "Book a table for two", "What time is it?", "hi"]


@pytest.mark.parametrize("choice", ["required", "named", "auto"])
def test_every_call_validates_at_temperature_one(tiny_256_loaded, choice):
    model, processor = tiny_256_loaded
    tool_choice = NAMED if choice == "named" else choice
    finished = 0
    for seed in range(12):
        reply = generate(model, processor, PROMPTS[seed % 4], 120, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, seed=seed)
        for call in reply.tool_calls:
            check_call(call, ["book"] if choice == "named" else None)
        if reply.finish_reason == "tool_calls":
            finished += 1
            assert reply.content is None and reply.tool_calls
        elif choice != "auto":
            assert reply.finish_reason == "length" and reply.content is None  # a call cut short is left out
        else:
            assert reply.tool_calls == [] and not reply.content.startswith("{")
    assert finished >= (8 if choice != "auto" else 0), finished


def test_parallel_tool_calls_false_gives_at_most_one_call(tiny_256_loaded):
    model, processor = tiny_256_loaded
    counts = []
    for parallel in (True, False):
        for seed in range(8):
            reply = generate(model, processor, "Do it all", 160, tools=[CLOCK], tool_choice="required", temperature=1.0,
                             seed=seed, parallel_tool_calls=parallel)
            for call in reply.tool_calls:
                check_call(call)
            counts.append((parallel, len(reply.tool_calls)))
    assert all(n <= 1 for parallel, n in counts if not parallel)
    assert all(n == 1 for parallel, n in counts if not parallel)  # {"name": "clock", "parameters": {}} always fits
    assert max(n for parallel, n in counts if parallel) > 1  # the same weights do chain calls when allowed


def test_response_format_works_in_the_python_api(tiny_256_loaded):
    model, processor = tiny_256_loaded
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    for seed in range(4):
        responses = list(stream_generate(model, processor, "JSON please", 60, temperature=1.0, seed=seed,
                                         response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}))
        assert responses[-1].finish_reason == "stop"
        jsonschema.validate(json.loads("".join(r.text for r in responses)), schema)
    with pytest.raises(ParameterError) as error:
        generate(model, processor, "hi", 4, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object", "minProperties": "x"}}})
    assert error.value.param == "response_format.json_schema.schema"


# --- the server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with running_server(["--model", str(checkpoint), "--max-batch", "8"], tmp_path_factory.mktemp("tools_server") / "stderr.txt") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=600)


def as_dicts(calls) -> list[dict]:
    return [call.model_dump() if hasattr(call, "model_dump") else call for call in calls or []]


def names_and_arguments(calls) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in as_dicts(calls)]


def streamed(client, checkpoint, **request):
    chunks = list(client.chat.completions.create(model=checkpoint.name, stream=True, stream_options={"include_usage": True}, **request))
    calls, content, finish = {}, "", None
    for chunk in chunks[:-1]:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": None, "type": None, "function": {"name": None, "arguments": ""}})
            if delta.id:
                assert entry["id"] is None and delta.function.name and delta.type == "function"  # id, type and name first
                entry.update(id=delta.id, type=delta.type)
                entry["function"]["name"] = delta.function.name
            entry["function"]["arguments"] += delta.function.arguments or ""
    assert chunks[-1].usage is not None
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice", ["required", NAMED, "auto"])
def test_server_calls_validate_and_stream_as_they_come_whole(client, checkpoint, tiny_256_loaded, tool_choice):
    request = dict(messages=[{"role": "user", "content": "Book it"}], tools=TOOLS, tool_choice=tool_choice, max_tokens=120)
    for seed in range(3):
        reply = client.chat.completions.create(model=checkpoint.name, temperature=1.0, seed=seed, **request)
        choice = reply.choices[0]
        for call in as_dicts(choice.message.tool_calls):
            check_call(call, ["book"] if tool_choice is NAMED else None)
        assert choice.finish_reason == ("tool_calls" if choice.message.tool_calls else choice.finish_reason)
    whole = client.chat.completions.create(model=checkpoint.name, temperature=0, **request).choices[0]
    content, calls, finish = streamed(client, checkpoint, temperature=0, **request)
    assert (content or None, names_and_arguments(calls), finish) == (whole.message.content, names_and_arguments(whole.message.tool_calls),
                                                                    whole.finish_reason)
    api = generate(*tiny_256_loaded, request["messages"], 120, tools=TOOLS, tool_choice=tool_choice, temperature=0)
    assert (api.content, names_and_arguments(api.tool_calls), api.finish_reason) == (
        whole.message.content, names_and_arguments(whole.message.tool_calls), whole.finish_reason)


def test_a_tool_result_in_the_history_reaches_the_prompt(client, checkpoint, tiny_256_loaded):
    model, processor = tiny_256_loaded
    first = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": "Time?"}], tools=[CLOCK],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0)
    message = first.choices[0].message
    (call,) = message.tool_calls
    usages = []
    for result in ("noon", "a quarter past eleven in the evening"):
        history = [{"role": "user", "content": "Time?"}, message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": result}]
        reply = client.chat.completions.create(model=checkpoint.name, messages=history, tools=[CLOCK], max_tokens=8, temperature=0)
        local = tool_messages(history, read_tools([CLOCK]), ToolChoice("auto"))
        assert json.dumps(result) in local[-1]["content"]
        assert reply.usage.prompt_tokens == len(processor.prepare(local).ids)
        api = generate(model, processor, history, 8, tools=[CLOCK], temperature=0)
        assert (reply.choices[0].message.content, names_and_arguments(reply.choices[0].message.tool_calls)) == (
            api.content, names_and_arguments(api.tool_calls))
        usages.append(reply.usage.prompt_tokens)
    assert usages[1] > usages[0]


def test_rows_with_tools_a_schema_and_neither_batch_together(client, checkpoint, tiny_256_loaded):
    model, processor = tiny_256_loaded
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    kinds = [dict(tools=TOOLS, tool_choice="required"), dict(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}), {}]
    cases = [(f"request {i} about cats", kinds[i % 3]) for i in range(9)]

    def one(case):
        prompt, extra = case
        reply = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": prompt}], max_tokens=60,
                                               temperature=0, **extra)
        return reply.choices[0].message.content, names_and_arguments(reply.choices[0].message.tool_calls)

    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(one, cases))
    for (prompt, extra), result in zip(cases, results):
        local = generate(model, processor, [{"role": "user", "content": prompt}], 60, temperature=0, **extra)
        expected = (local.content, names_and_arguments(local.tool_calls)) if "tools" in extra else (local, [])
        assert result == expected, prompt


def post(server, body):
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300)


CALL = {"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
BAD_REQUESTS = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"tools": [CLOCK, CLOCK]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}}}]},
     "tools"),
    ({"tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice.function.name"),
    ({"tools": [CLOCK], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [CLOCK], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [CLOCK], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "x" * (1 << 20)}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c1", "content": "r"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "clock", "arguments": "{"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("body, param", BAD_REQUESTS)
def test_bad_tool_requests_get_400_naming_the_parameter(server, checkpoint, body, param):
    response = post(server, {"model": checkpoint.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "\n" not in error["message"]


def test_the_cli_prints_the_servers_calls(client, checkpoint, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    reply = client.chat.completions.create(model=checkpoint.name, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                                           tool_choice="required", max_tokens=120, temperature=0)
    run = subprocess.run([sys.executable, "-m", "mlx_gemma3n.generate", "--model", str(checkpoint), "--prompt", "Weather?", "--tools",
                          str(tools), "--tool-choice", "required", "--max-tokens", "120", "--temp", "0"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert (printed["content"], names_and_arguments(printed["tool_calls"])) == (
        reply.choices[0].message.content, names_and_arguments(reply.choices[0].message.tool_calls))
    bad = subprocess.run([sys.executable, "-m", "mlx_gemma3n.generate", "--model", str(checkpoint), "--prompt", "x", "--tools",
                          str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "missing.json" in bad.stderr
