"""A thinking model through the official SDK: chorus serving the default model with
`--chat-template templates/thinking.jinja` (CHORUS_THINKING_URL), a template in Qwen3's
form whose assistant turns carry their reasoning in a <think> block. The model reasons
only as it was shown to: earlier turns reasoned "abc" and answered "Done.", and greedy
decoding copies that, so the split of reasoning from answer is checked exactly."""

import json
import os

import openai
import pytest

BASE = os.environ.get("CHORUS_THINKING_URL")
MODEL = "smollm2-thinking"

pytestmark = pytest.mark.skipif(BASE is None, reason="CHORUS_THINKING_URL is not set")

ASK = {"role": "user", "content": "Say done."}
TURN = {"role": "assistant", "reasoning_content": "abc", "content": "Done."}
HISTORY = [ASK, TURN, ASK, TURN, ASK]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_returns_reasoning_apart_from_the_answer(client):
    r = client.chat.completions.create(model=MODEL, messages=HISTORY, max_tokens=60, temperature=0)
    message = r.choices[0].message
    assert message.content == "Done."
    assert message.reasoning_content == "abc"
    # The block's tokens, read through the SDK's usage types.
    reasoning_tokens = r.usage.completion_tokens_details.reasoning_tokens
    assert 0 < reasoning_tokens < r.usage.completion_tokens


def test_streamed_reasoning_comes_first_in_its_own_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=HISTORY, max_tokens=60, temperature=0, stream=True)
    parts = []
    for chunk in stream:
        for choice in chunk.choices:
            reasoning = getattr(choice.delta, "reasoning_content", None)
            if reasoning:
                parts.append(("reasoning", reasoning))
            if choice.delta.content:
                parts.append(("content", choice.delta.content))
    kinds = [k for k, _ in parts]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning"), parts
    assert "".join(t for k, t in parts if k == "reasoning") == "abc"
    assert "".join(t for k, t in parts if k == "content") == "Done."


def test_structured_output_follows_the_reasoning(client):
    r = client.chat.completions.create(
        model=MODEL, messages=HISTORY, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "word", "schema": {
            "type": "object", "properties": {"word": {"type": "string", "maxLength": 8}},
            "required": ["word"], "additionalProperties": False}}})
    message = r.choices[0].message
    assert message.reasoning_content == "abc"
    assert set(json.loads(message.content)) == {"word"}


def responses_input():
    """HISTORY as a Responses client keeps it: each answer a reasoning item and a message."""
    items = []
    for m in HISTORY:
        if m["role"] == "assistant":
            items.append({"type": "reasoning", "summary": [],
                          "content": [{"type": "reasoning_text", "text": m["reasoning_content"]}]})
            items.append({"role": "assistant", "content": m["content"]})
        else:
            items.append(m)
    return items


def test_responses_give_reasoning_its_own_item_and_an_agent_loop_sends_it_back(client):
    items = responses_input()
    r = client.responses.create(model=MODEL, input=items, max_output_tokens=60, temperature=0)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "abc"
    assert r.output_text == "Done."
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    # As agent loops do without a stored chain: the output items go back as input.
    items += [o.model_dump(exclude_none=True) for o in r.output] + [ASK]
    again = client.responses.create(model=MODEL, input=items, max_output_tokens=60, temperature=0)
    assert again.output[0].content[0].text == "abc"
    assert again.output_text == "Done."


def test_the_sdk_stream_helper_rebuilds_the_reasoning_item(client):
    with client.responses.stream(model=MODEL, input=responses_input(), max_output_tokens=60,
                                 temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "abc"
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "abc"
    assert final.output_text == "Done."
