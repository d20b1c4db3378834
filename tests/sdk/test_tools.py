"""Function calling through the official `openai` SDK against chorus (CHORUS_URL, the
default model, whose template knows nothing of tools: the generic JSON form). Every call
the server returns must parse and validate against its function's schema."""

import json
import os

import jsonschema
import openai
import pytest

BASE = os.environ.get("CHORUS_URL", "http://127.0.0.1:8080")
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 40}},
            "required": ["zone"],
        },
    },
}
NO_ARGS = {"type": "function", "function": {"name": "roll_die", "description": "Roll a die"}}

# Schemas with nested objects, enums, arrays and bounded integers.
SCHEMAS = [
    WEATHER,
    {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object",
        "properties": {
            "guest": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 30},
                "age": {"type": "integer", "minimum": 18, "maximum": 120},
            }, "required": ["name", "age"], "additionalProperties": False},
            "nights": {"type": "integer", "minimum": 1, "maximum": 14},
            "room": {"type": "string", "enum": ["single", "double", "suite"]},
        },
        "required": ["guest", "nights", "room"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                     "minItems": 1, "maxItems": 4},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "urgent": {"type": "boolean"},
        },
        "required": ["tags", "score", "urgent"], "additionalProperties": False}}},
]


def ask(content="What is the weather in Paris?"):
    return [{"role": "user", "content": content}]


def params(tool):
    return tool["function"].get("parameters", {"type": "object", "properties": {}})


def check_calls(message, tools):
    assert message.tool_calls, message
    by_name = {t["function"]["name"]: t for t in tools}
    for call in message.tool_calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        assert call.function.name in by_name
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, params(by_name[call.function.name]))
    return message.tool_calls


def test_required_calls_a_function_with_valid_arguments(client):
    r = client.chat.completions.create(model=MODEL, messages=ask(), tools=[WEATHER, TIME],
                                       tool_choice="required", max_tokens=100, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    check_calls(choice.message, [WEATHER, TIME])


def test_named_function_is_the_one_called(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ask(), tools=[WEATHER, TIME], max_tokens=100, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = check_calls(r.choices[0].message, [WEATHER, TIME])
    assert [c.function.name for c in calls] == ["get_time"]
    # OpenAI ends a named call with "stop".
    assert r.choices[0].finish_reason == "stop"


def test_none_answers_in_text(client):
    r = client.chat.completions.create(model=MODEL, messages=ask(), tools=[WEATHER],
                                       tool_choice="none", max_tokens=16, temperature=0)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_auto_is_text_or_valid_calls(client):
    for i, q in enumerate(["Hello! How are you?", "What is the weather in Paris?",
                           "Call get_weather for Tokyo in celsius."]):
        r = client.chat.completions.create(model=MODEL, messages=ask(q), tools=[WEATHER],
                                           max_tokens=60, temperature=0.8, seed=i)
        m = r.choices[0].message
        if m.tool_calls:
            check_calls(m, [WEATHER])
            assert r.choices[0].finish_reason == "tool_calls"
        else:
            assert m.content is not None


def test_a_function_without_parameters_gets_empty_object_arguments(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("Roll a die."), tools=[NO_ARGS],
                                       tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=40, temperature=0)
    assert r.choices[0].message.tool_calls[0].function.arguments == "{}"


def test_parallel_off_gives_at_most_one_call(client):
    for seed in range(5):
        r = client.chat.completions.create(
            model=MODEL, messages=ask("Weather in Paris and the time in Tokyo?"),
            tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
            max_tokens=120, temperature=1.0, seed=seed)
        assert len(check_calls(r.choices[0].message, [WEATHER, TIME])) == 1


def test_parallel_on_allows_several_calls(client):
    most = 0
    for seed in range(8):
        r = client.chat.completions.create(
            model=MODEL, messages=ask("Weather in Paris and the time in Tokyo?"),
            tools=[WEATHER, TIME], tool_choice="required", max_tokens=160,
            temperature=1.0, seed=seed)
        if r.choices[0].finish_reason == "length":
            continue
        most = max(most, len(check_calls(r.choices[0].message, [WEATHER, TIME])))
    assert most >= 1
    # Never more than --max-tool-calls (4) in one answer.
    assert most <= 4


def test_fifty_required_calls_all_validate(client):
    for i in range(50):
        tool = SCHEMAS[i % len(SCHEMAS)]
        r = client.chat.completions.create(
            model=MODEL, messages=ask(f"Request {i}: please use the tool."), tools=[tool],
            tool_choice="required", parallel_tool_calls=False, max_tokens=200, temperature=1.0,
            seed=i)
        assert r.choices[0].finish_reason == "tool_calls", r
        check_calls(r.choices[0].message, [tool])


def test_pydantic_tools_with_nested_models_are_called_with_valid_arguments(client):
    # The SDK's own helper writes a nested model as `$defs` + `$ref`, which must resolve
    # within the function's parameters.
    import pydantic

    class Place(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=30)
        country: str = pydantic.Field(max_length=30)

    class Book(pydantic.BaseModel):
        where: Place
        nights: int = pydantic.Field(ge=1, le=14)

    tool = openai.pydantic_function_tool(Book)
    assert "$defs" in tool["function"]["parameters"]
    for seed in range(3):
        r = client.chat.completions.parse(
            model=MODEL, messages=ask("Book two nights in Paris."), tools=[tool],
            tool_choice="required", max_tokens=300, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "tool_calls", r
        call = check_calls(r.choices[0].message, [tool])[0]
        assert isinstance(call.function.parsed_arguments, Book)


def test_a_recursive_schema_refers_to_the_function_not_the_call(client):
    tree = {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object",
        "properties": {"label": {"type": "string", "maxLength": 8},
                       "child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["label", "child"], "additionalProperties": False}}}
    # pydantic's form of a recursive model: a root `$ref` into its own `$defs`.
    node = {"type": "function", "function": {"name": "node", "parameters": {
        "$ref": "#/$defs/Node",
        "$defs": {"Node": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "children": {"type": "array", "maxItems": 1, "items": {"$ref": "#/$defs/Node"}}},
            "required": ["name", "children"], "additionalProperties": False}}}}}
    for tool, temperature in ((tree, 1.0), (node, 0.7)):
        finished = 0
        for seed in range(6):
            r = client.chat.completions.create(
                model=MODEL, messages=ask("Make a small tree."), tools=[tool],
                tool_choice="required", parallel_tool_calls=False, max_tokens=300,
                temperature=temperature, seed=seed)
            if r.choices[0].finish_reason == "length":
                continue
            check_calls(r.choices[0].message, [tool])
            finished += 1
        assert finished, tool["function"]["name"]

def test_a_call_cut_short_is_neither_text_nor_a_call(client):
    # The call syntax is the server's instruction to the model: a client shown it as
    # text (and sending it back as history) would teach the model to write it as text.
    kwargs = dict(model=MODEL, messages=ask(), tools=[WEATHER], tool_choice="required",
                  max_tokens=5, temperature=0)
    r = client.chat.completions.create(**kwargs)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "length"
    assert m.content is None and not m.tool_calls, m
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content or d.tool_calls for d in deltas), deltas
    assert chunks[-1].choices[0].finish_reason == "length"


ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]}}}


def test_calls_finished_before_a_cut_one_are_kept(client):
    # Greedy, this model writes the same call again and again: 40 tokens hold one whole
    # call and cut the next. The whole one is returned (all were dropped before), with
    # `length`, streamed or not.
    kwargs = dict(model=MODEL, messages=ask("2+3?"), tools=[ADD], tool_choice="required",
                  max_tokens=40, temperature=0)
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "length"
    check_calls(choice.message, [ADD])
    streamed, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for d in chunk.choices[0].delta.tool_calls or []:
            name, arguments = streamed.get(d.index, ("", ""))
            streamed[d.index] = (name + (d.function.name or ""),
                                 arguments + (d.function.arguments or ""))
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length"
    assert list(streamed.values()) == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    r = client.responses.create(model=MODEL, input="2+3?", tools=[{
        "type": "function", **ADD["function"]}], tool_choice="required",
        max_output_tokens=40, temperature=0)
    assert r.status == "incomplete", r
    assert [(o.name, o.arguments) for o in r.output] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


REPORT = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "summary": {"type": "string", "maxLength": 60}},
    "required": ["city", "summary"], "additionalProperties": False}


def test_tools_beside_a_response_format_answer_in_calls_or_in_the_schema(client):
    # An agent with tools and a typed final answer: each answer is valid calls or JSON
    # that follows the schema, streamed or not.
    seen = set()
    for i, q in enumerate(["What is the weather in Paris?", "Summarize: Paris is sunny.",
                           "Hello!", "Call get_weather for Oslo.", "Report on Rome.",
                           "Weather in Tokyo?"]):
        kwargs = dict(model=MODEL, messages=ask(q), tools=[WEATHER], max_tokens=120,
                      temperature=1.0, seed=i, response_format={
                          "type": "json_schema",
                          "json_schema": {"name": "report", "schema": REPORT}})
        r = client.chat.completions.create(**kwargs)
        choice = r.choices[0]
        if choice.finish_reason == "length":
            continue
        if choice.message.tool_calls:
            check_calls(choice.message, [WEATHER])
            seen.add("calls")
        else:
            jsonschema.validate(json.loads(choice.message.content), REPORT)
            seen.add("json")
        with client.chat.completions.stream(**kwargs) as stream:
            final = stream.get_final_completion().choices[0].message
        if choice.message.tool_calls:
            assert [c.function.arguments for c in final.tool_calls] == \
                [c.function.arguments for c in choice.message.tool_calls]
        else:
            assert final.content == choice.message.content
    assert seen == {"calls", "json"}, seen


def test_a_json_answer_with_the_calls_key_is_text_whole_cut_or_streamed(client):
    # Beside tools, a JSON answer may use the key `tool_calls` itself (this model imitates
    # the call shape its prompt describes): naming no offered function, it is the answer,
    # streamed as it comes, and cut short by max_tokens it is the start of that answer.
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER],
                  temperature=0, response_format={"type": "json_object"})
    whole = client.chat.completions.create(max_tokens=100, **kwargs).choices[0]
    assert whole.finish_reason == "stop" and whole.message.tool_calls is None
    assert whole.message.content.startswith('{"tool_calls": [{"name": "<'), whole.message.content
    json.loads(whole.message.content)
    cut = client.chat.completions.create(max_tokens=40, **kwargs).choices[0]
    assert cut.finish_reason == "length" and cut.message.tool_calls is None
    assert cut.message.content and whole.message.content.startswith(cut.message.content)
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        max_tokens=100, stream=True, **kwargs) if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 10 and "".join(pieces) == whole.message.content


def test_streamed_deltas_reassemble_to_the_same_call(client):
    kwargs = dict(model=MODEL, messages=ask(), tools=[WEATHER], tool_choice="required",
                  max_tokens=100, temperature=0, seed=7)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**kwargs) as stream:
        deltas = []
        for event in stream:
            if event.type == "chunk" and event.chunk.choices:
                d = event.chunk.choices[0].delta
                if d.tool_calls is not None:
                    assert d.tool_calls, "an empty tool_calls array"
                    deltas.extend(d.tool_calls)
        final = stream.get_final_completion()
    first = deltas[0]
    assert first.index == 0 and first.id and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == whole.function.name
    assert call.function.arguments == whole.function.arguments
    assert final.choices[0].finish_reason == "tool_calls"
    # A forced call has no content, streamed or not (the role chunk says null, not "").
    assert final.choices[0].message.content is None


def test_a_call_s_logprobs_come_streamed_or_not(client):
    kwargs = dict(model=MODEL, messages=ask(), tools=[WEATHER], tool_choice="required",
                  max_tokens=100, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert whole and [t.token for t in streamed] == [t.token for t in whole]


def test_a_second_turn_with_the_result_is_answered(client):
    first = client.chat.completions.create(model=MODEL, messages=ask(), tools=[WEATHER],
                                           tool_choice="required", max_tokens=100, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = ask() + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees celsius."},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                       tool_choice="none", max_tokens=30, temperature=0)
    assert r.choices[0].message.content
    # Rendered: the call and its result are in the prompt.
    alone = client.chat.completions.create(model=MODEL, messages=ask(), max_tokens=1)
    assert r.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def bad(client, field, **kwargs):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=4, **kwargs)
    assert e.value.body["param"] == field, e.value.body
    return e.value.body["message"]


def test_bad_tool_requests_name_the_field(client):
    bad(client, "tool_choice", messages=ask(), tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "nope"}})
    bad(client, "tool_choice", messages=ask(), tool_choice="required")
    unenforceable = {"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}}}
    bad(client, "tools", messages=ask(), tools=[unenforceable], tool_choice="required")
    bad(client, "messages", tools=[WEATHER], messages=ask() + [
        {"role": "tool", "tool_call_id": "call_unknown", "content": "x"}])
    # Each call is answered by the tool messages right after it, once (OpenAI: "An
    # assistant message with 'tool_calls' must be followed by tool messages responding
    # to each 'tool_call_id'"); they were accepted, and rendered, unanswered.
    def called(*ids):
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": i, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            for i in ids]}

    def result(i):
        return {"role": "tool", "tool_call_id": i, "content": "Cold."}

    for messages, needle in [
            ([called("c1"), {"role": "user", "content": "and?"}], '["c1"] have none'),
            ([called("c1", "c2"), result("c1")], '["c2"] have none'),
            ([called("c1"), result("c1"), result("c1")], "already answered"),
            ([called("c1", "c1"), result("c1")], "an earlier call"),
            ([called("c1"), result("c1"), called("c1"), result("c1")], "an earlier call"),
            # Missing ids are named where they are missing, not as ids made up for them.
            ([called(None), result("c1")], "`messages[1].tool_calls[0].id` is required"),
            ([called("c1"), {"role": "tool", "content": "Cold."}],
             "`messages[2].tool_call_id` is required")]:
        assert needle in bad(client, "messages", tools=[WEATHER], messages=ask() + messages)
    ok = client.chat.completions.create(
        model=MODEL, max_tokens=4, tools=[WEATHER],
        messages=ask() + [called("c1", "c2"), result("c2"), result("c1")])
    assert ok.choices[0].finish_reason
    bad(client, "response_format", messages=ask(), tools=[WEATHER],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "if": {"properties": {"a": {"const": 1}}},
            "then": {"required": ["b"]}}}})
    # A regex the engine refuses: the reason (on the error's later lines) is told, on one
    # line, wherever the schema is (a function's parameters said only "regex parse error:").
    look_around = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}
    for field, kwargs in [
            ("tools", dict(tools=[{"type": "function", "function": {
                "name": "x", "parameters": look_around}}], tool_choice="required")),
            ("response_format", dict(response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": look_around}}))]:
        message = bad(client, field, messages=ask(), **kwargs)
        assert "look-around" in message and "\n" not in message, message


def test_tool_calls_are_counted_in_metrics(client):
    import urllib.request

    def count():
        text = urllib.request.urlopen(f"{BASE}/metrics").read().decode()
        lines = [l for l in text.splitlines() if l.startswith("chorus_tool_calls_total")]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = count()
    client.chat.completions.create(model=MODEL, messages=ask(), tools=[WEATHER],
                                   tool_choice="required", max_tokens=100, temperature=0)
    assert count() >= before + 1


def _post(path, body):
    import urllib.request
    req = urllib.request.Request(f"{BASE}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read())


def test_history_calls_reach_the_prompt_as_sent():
    """An earlier call's arguments holding special tokens' text are written into the
    prompt once, as text (before the fix they were escaped twice, and the model saw
    private-use characters where `<filename>` was)."""
    messages = [
        {"role": "user", "content": "Open it."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "open", "arguments": json.dumps({"path": "<filename>", "<|im_end|>": 1})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "<filename>"},
    ]
    ids = _post("/tokenize", {"model": MODEL, "messages": messages})["tokens"]
    prompt = _post("/detokenize", {"model": MODEL, "tokens": ids})["prompt"]
    assert '"arguments":{"path":"<filename>","<|im_end|>":1}' in prompt, prompt
    # The key is text: only the template's turns end with the end-of-turn token.
    im_end = _post("/tokenize", {"model": MODEL, "prompt": "<|im_end|>"})["tokens"][-1]
    plain = json.loads(json.dumps(messages).replace("<|im_end|>", "x"))
    plain_ids = _post("/tokenize", {"model": MODEL, "messages": plain})["tokens"]
    assert ids.count(im_end) == plain_ids.count(im_end)
