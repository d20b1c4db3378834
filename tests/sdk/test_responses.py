"""The Responses API through the official `openai` SDK against chorus (CHORUS_URL, the
default model): text, structured output, function calls and their outputs, the streamed
event sequence, stored responses (retrieve, input_items, delete), chaining by
`previous_response_id`, refusals of what is not supported, and the OpenAI Agents SDK on
its default (Responses) model."""

import asyncio
import json
import os

import jsonschema
import openai
import pytest

BASE = os.environ.get("CHORUS_URL", "http://127.0.0.1:8080")
MODEL = "smollm2-135m-instruct"

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)


def test_text_response_and_its_usage(client):
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=16,
                                temperature=0)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete")
    if r.status == "completed":
        assert r.created_at <= r.completed_at <= r.created_at + 120
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].content[0].type == "output_text"
    assert r.output_text.strip()
    u = r.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 16
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens <= u.input_tokens


def test_a_stored_response_parses_as_the_sdks_type_strictly(client):
    import httpx
    from openai.types.responses import Response

    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=4)
    stored = httpx.get(f"{BASE}/v1/responses/{r.id}").json()
    # model_validate checks every field's type, which the SDK's own reading does not.
    assert Response.model_validate(stored).usage.input_tokens_details.cache_write_tokens == 0


def test_input_tokens_are_counted_as_a_response_would_use_them(client):
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=4,
                                    instructions="Be brief.", tools=[WEATHER])
    counted = client.responses.input_tokens.count(model=MODEL, input="My name is Ada.",
                                                   instructions="Be brief.", tools=[WEATHER])
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == first.usage.input_tokens
    # A chained turn counts the whole conversation it continues.
    second = client.responses.create(model=MODEL, input="What is it?", max_output_tokens=4,
                                     previous_response_id=first.id)
    counted = client.responses.input_tokens.count(model=MODEL, input="What is it?",
                                                   previous_response_id=first.id)
    assert counted.input_tokens == second.usage.input_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.input_tokens.count(model=MODEL, input=[])
    assert e.value.body["param"] == "input"


def test_tool_choice_auto_without_tools_is_a_plain_answer(client):
    # What every response reports back when it offered no tools; the Agents SDK sends
    # its ModelSettings.tool_choice whether or not an agent has tools.
    r = client.responses.create(model=MODEL, input="hi", tool_choice="auto", tools=[],
                                max_output_tokens=2)
    assert r.output[0].type == "message"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", tool_choice="required",
                                max_output_tokens=2)
    assert e.value.body["param"] == "tool_choice"


def test_cut_short_is_incomplete(client):
    r = client.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=3)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    # Only a completed response says when it completed.
    assert r.completed_at is None


def test_structured_output_follows_the_schema(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20},
                       "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=MODEL, input="Invent a person.", max_output_tokens=60, temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                         "strict": True}})
    assert r.status == "completed", r
    assert r.created_at <= r.completed_at <= r.created_at + 120
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_stored_response_retrieve_input_items_delete(client):
    r = client.responses.create(model=MODEL, instructions="Be brief.",
                                input=[{"role": "user", "content": "Name a colour."}],
                                max_output_tokens=8, metadata={"suite": "responses"})
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    assert got.instructions == "Be brief." and got.metadata == {"suite": "responses"}
    items = client.responses.input_items.list(r.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].role == "user" and items.data[0].content[0].text == "Name a colour."
    deleted = client.responses.delete(r.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    # A deleted response can no longer be chained on.
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="And another?", previous_response_id=r.id)
    assert e.value.body["code"] == "previous_response_not_found"


def test_unknown_previous_response_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"
    assert e.value.body["code"] == "previous_response_not_found"


def test_store_false_is_not_kept(client):
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=4, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_chained_turn_sees_the_earlier_one_and_reuses_its_cache(client):
    first = client.responses.create(model=MODEL, input="My name is Ada. Say hi.",
                                    max_output_tokens=12, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=12,
                                     temperature=0)
    assert second.previous_response_id == first.id
    # The second prompt holds the first turn: more tokens, the first ones from the cache.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 16 * 16
    # Instructions are not carried over.
    assert second.instructions is None


def test_function_call_and_its_output(client):
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?",
                                tools=[WEATHER], tool_choice="required", temperature=0,
                                parallel_tool_calls=False, max_output_tokens=100)
    assert r.status == "completed", r
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    # The result goes back by `previous_response_id`...
    follow = client.responses.create(
        model=MODEL, previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "Sunny, 21 degrees."}],
        max_output_tokens=30, temperature=0)
    assert follow.output[0].type == "message" and follow.output_text.strip()
    assert follow.usage.input_tokens_details.cached_tokens > 0
    # ...or with the whole history resent, as stateless clients do.
    resent = client.responses.create(
        model=MODEL, tools=[WEATHER], tool_choice="none", store=False,
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               calls[0].model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "Sunny, 21 degrees."}],
        max_output_tokens=30, temperature=0)
    assert resent.output_text == follow.output_text


def test_max_tool_calls_bounds_the_calls(client):
    """`max_tool_calls` (which OpenAI applies to built-in tools) bounds function calls
    here, and is echoed (it was a 400)."""
    r = client.responses.create(model=MODEL, input="Weather in Paris, Rome, Oslo and Lima?",
                                tools=[WEATHER], tool_choice="required", temperature=0,
                                max_tool_calls=1, max_output_tokens=200)
    assert r.max_tool_calls == 1
    assert len([o for o in r.output if o.type == "function_call"]) == 1


def test_a_call_cut_short_leaves_no_output(client):
    # Neither a call nor the call syntax as a message (which the next turn would replay).
    kwargs = dict(model=MODEL, input="Weather in Oslo?", tools=[WEATHER],
                  tool_choice="required", max_output_tokens=6)
    r = client.responses.create(**kwargs)
    assert r.status == "incomplete" and r.output == [], r.output
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    types = event_types(events)
    final = events[-1].response
    assert final.status == "incomplete" and final.output == []
    assert types == ["response.created", "response.in_progress", "response.incomplete"]


def test_item_ids_are_unique_and_calls_are_answered(client):
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                                tool_choice="required", parallel_tool_calls=False,
                                max_output_tokens=100, temperature=0)
    call = r.output[0]
    assert call.type == "function_call"

    def refused(**kwargs):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, max_output_tokens=4, **kwargs)
        assert e.value.body["param"] == "input", e.value.body
        return e.value.body["message"]

    assert "duplicate item id" in refused(input=[
        {"type": "message", "id": "msg_same", "role": "user", "content": "a"},
        {"type": "message", "id": "msg_same", "role": "user", "content": "b"}])
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny."}
    # The call resent beside `previous_response_id` would be rendered twice.
    assert call.id in refused(previous_response_id=r.id,
                              input=[call.model_dump(exclude_none=True), output])
    assert call.call_id in refused(previous_response_id=r.id, input="And in Rome?")
    # Calls in `input` itself are answered as well (OpenAI: "No tool output found"), once.
    mine = {"type": "function_call", "call_id": "call_mine", "name": "get_weather",
            "arguments": '{"city": "Oslo"}'}
    answer = {"type": "function_call_output", "call_id": "call_mine", "output": "Cold."}
    assert "call_mine" in refused(input=[mine, {"role": "user", "content": "and?"}])
    assert "already answered" in refused(input=[mine, answer, answer])
    assert "call_mine" in refused(input=[mine, dict(mine, arguments="{}"), answer])
    ok = client.responses.create(model=MODEL, previous_response_id=r.id, input=[output],
                                 max_output_tokens=4)
    assert ok.status in ("completed", "incomplete")


def event_types(events):
    return [e.type for e in events]


def test_streamed_text_events_in_order(client):
    # Greedy, this question's answer ends well within the limit: `response.completed`.
    with client.responses.stream(model=MODEL, input="What is 2+2?", max_output_tokens=60,
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = event_types(events)
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas
    tail = [t for t in types[4:] if t != "response.output_text.delta"]
    assert tail[:3] == ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done"]
    assert tail[-1] == "response.completed" and len(tail) == 4
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(d.delta for d in deltas)
    assert text == final.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text
    # Stored before the last event: retrievable at once, the same answer.
    assert client.responses.retrieve(final.id).output_text == text


def test_streamed_function_call_events(client):
    with client.responses.stream(model=MODEL, input="Weather in Rome?", tools=[WEATHER],
                                 tool_choice="required", max_output_tokens=100,
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = event_types(events)
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in types
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    jsonschema.validate(json.loads(done.arguments), WEATHER["parameters"])
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    assert final.output[0].type == "function_call"
    assert final.output[0].arguments == done.arguments
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_input_items_come_a_page_at_a_time(client):
    turns = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
             {"role": "user", "content": "three"}]
    r = client.responses.create(model=MODEL, input=turns, max_output_tokens=2)
    text = lambda item: item.content[0].text
    # OpenAI's default order: the last item first.
    assert [text(i) for i in client.responses.input_items.list(r.id).data] == \
        ["three", "two", "one"]
    first = client.responses.input_items.list(r.id, order="asc", limit=1)
    assert [text(i) for i in first.data] == ["one"] and first.has_more
    # The SDK's auto-pagination follows `after` to the end.
    assert [text(i) for i in client.responses.input_items.list(r.id, order="asc", limit=2)] == \
        ["one", "two", "three"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.input_items.list(r.id, limit=0)
    assert e.value.body["param"] == "limit"


def test_streamed_cut_short_ends_incomplete(client):
    with client.responses.stream(model=MODEL, input="Tell me a story.",
                                 max_output_tokens=2) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("fields,param", [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"reasoning": {"summary": "auto"}}, "reasoning"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"text": {"format": {"type": "yaml"}}}, "text"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_tool_calls": 0}, "max_tool_calls"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "strict": "yes",
                          "schema": {"type": "object"}}}}, "text"),
    ({"text": {"verbosity": "huge"}}, "text"),
    ({"tools": [{"type": "function", "name": "f", "strict": "yes"}]}, "tools"),
    ({"input": [{"type": 5, "role": "user", "content": "hi"}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": "hi", "id": 5}]}, "input"),
    ({"text": "json"}, "text"),
])
def test_unsupported_fields_are_refused_by_name(client, fields, param):
    body = {"model": MODEL, "input": "hi", **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/responses", body=body, cast_to=object)
    assert e.value.body["param"] == param, e.value.body


def test_an_array_body_is_not_read_as_a_request():
    """serde reads a struct from an array by position; `[null, "Say hi"]` was served."""
    import httpx
    for path in ["/v1/responses", "/v1/responses/input_tokens", "/v1/chat/completions"]:
        r = httpx.post(f"{BASE}{path}", json=[None, "Say hi"], timeout=60)
        assert r.status_code == 400, (path, r.text)


def test_sampling_defaults_are_echoed_and_a_stored_response_is_not_restreamed_or_cancelled(client):
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    assert (r.temperature, r.top_p) == (1.0, 1.0)
    import httpx
    got = httpx.get(f"{BASE}/v1/responses/{r.id}?stream=true", timeout=60)
    assert got.status_code == 400 and got.json()["error"]["param"] == "stream", got.text
    cancel = httpx.post(f"{BASE}/v1/responses/{r.id}/cancel", timeout=60)
    assert cancel.status_code == 400, cancel.text
    assert httpx.post(f"{BASE}/v1/responses/resp_nope/cancel", timeout=60).status_code == 404


def test_asking_for_no_reasoning_is_served(client):
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=2,
                                reasoning={"effort": "none"})
    assert r.status == "incomplete"


@pytest.mark.parametrize("fields,needle", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
     "`tools[0].parameters`"),
    ({"tools": [WEATHER, {"type": "function", "name": "spell", "parameters": {
        "type": "object", "properties": {"word": {"type": "string", "pattern": "(?=a)b"}}}}]},
     '`tools[1].parameters` (function "spell") cannot be enforced'),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, '{"type": "function", "name": ...}'),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "mode": "auto"}},
     "allowed_tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "Responses tools are flat"),
])
def test_tool_errors_describe_the_responses_shapes(client, fields, needle):
    body = {"model": MODEL, "input": "hi", **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/responses", body=body, cast_to=object)
    assert needle in e.value.body["message"], e.value.body
    assert "function.parameters" not in e.value.body["message"]


def test_openai_agents_sdk_default_model_runs_a_tool_loop():
    import dataclasses

    from agents import (RunConfig, Runner, set_default_openai_api, set_default_openai_client,
                        set_tracing_disabled)
    from openai import AsyncOpenAI
    from weather_agent import weather_agent

    set_tracing_disabled(True)
    # The SDK's defaults: the Responses API, a plain model name.
    set_default_openai_client(AsyncOpenAI(base_url=f"{BASE}/v1", api_key="unused",
                                          max_retries=0), use_for_tracing=False)
    set_default_openai_api("responses")
    calls = []
    agent = weather_agent(MODEL, calls)

    async def run(streamed):
        calls.clear()
        agent.model_settings = dataclasses.replace(agent.model_settings, tool_choice="required")
        run_config = RunConfig(tracing_disabled=True)
        if not streamed:
            return await Runner.run(agent, "What is the weather in Paris?", max_turns=4,
                                    run_config=run_config)
        result = Runner.run_streamed(agent, "What is the weather in Oslo?", max_turns=4,
                                     run_config=run_config)
        async for _ in result.stream_events():
            pass
        return result

    async def both():
        for streamed in (False, True):
            result = await run(streamed)
            assert calls, f"the tool was never called (streamed={streamed})"
            assert isinstance(result.final_output, str) and result.final_output.strip()

    asyncio.run(both())


def test_openai_agents_sdk_with_a_typed_answer_and_a_tool():
    # `output_type` beside `tools`: the answer after the call follows the type's schema.
    import pydantic
    from agents import (RunConfig, Runner, set_default_openai_api, set_default_openai_client,
                        set_tracing_disabled)
    from openai import AsyncOpenAI
    from weather_agent import weather_agent

    class Report(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=20)
        summary: str = pydantic.Field(max_length=60)

    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=f"{BASE}/v1", api_key="unused",
                                          max_retries=0), use_for_tracing=False)
    set_default_openai_api("responses")
    calls = []
    agent = weather_agent(MODEL, calls, output_type=Report)
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=4,
                                    run_config=RunConfig(tracing_disabled=True)))
    assert calls, "the tool was never called"
    assert isinstance(result.final_output, Report), result.final_output


def test_text_format_beside_tools_answers_in_calls_or_in_the_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    seen = set()
    for i, q in enumerate(["What is the weather in Paris?", "Name a city as JSON.",
                           "Hello!", "Weather in Oslo?"]):
        r = client.responses.create(
            model=MODEL, input=q, tools=[WEATHER], max_output_tokens=100, temperature=1.0,
            text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
        if r.status != "completed":
            continue
        kinds = {o.type for o in r.output}
        if kinds == {"function_call"}:
            for call in r.output:
                jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
        else:
            assert kinds == {"message"}, r.output
            jsonschema.validate(json.loads(r.output_text), schema)
        seen |= kinds
    assert seen, "every answer was cut short"
