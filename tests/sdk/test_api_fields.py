"""The rest of the OpenAI surface through the official SDK against a running chorus
(CHORUS_URL): log-probabilities, several choices, penalties and biases, min_tokens,
stop_token_ids, structured output, echo, and a 400 naming the field for each bad value."""

import json
import math
import os
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

BASE = os.environ.get("CHORUS_URL", "http://127.0.0.1:8080")
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content, **kw):
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw
    )


def metric(name):
    text = urllib.request.urlopen(f"{BASE}/metrics").read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1))


def token_id(text):
    req = urllib.request.Request(
        f"{BASE}/tokenize",
        data=json.dumps({"prompt": text}).encode(),
        headers={"content-type": "application/json"},
    )
    ids = json.load(urllib.request.urlopen(req))["tokens"]
    assert len(ids) == 1, ids
    return ids[0]


def test_chat_logprobs_shape_and_distribution(client):
    r = chat(client, "Tell me about the sea.", max_tokens=24, temperature=1, seed=11,
             logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    seen_in_top = 0
    for e in entries:
        assert e.logprob <= 0
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == 5
        probs = [math.exp(t.logprob) for t in e.top_logprobs]
        assert sum(probs) <= 1 + 1e-4
        assert probs == sorted(probs, reverse=True)
        for t in e.top_logprobs:
            if t.token == e.token:
                assert abs(t.logprob - e.logprob) < 1e-6
                seen_in_top += 1
    # At temperature 1 the drawn token is almost always among the 5 most likely.
    assert seen_in_top >= len(entries) // 2


def test_chat_logprobs_stream(client):
    stream = chat(client, "Count to five.", max_tokens=12, temperature=0, logprobs=True,
                  top_logprobs=2, stream=True, stream_options={"include_usage": True})
    text, tokens, usage = "", [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs and c.logprobs.content:
                tokens.extend(c.logprobs.content)
    assert len(tokens) == usage.completion_tokens
    assert "".join(t.token for t in tokens) == text
    # Greedy: every drawn token is the most likely one.
    assert all(t.top_logprobs[0].token == t.token for t in tokens)


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                  temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert len(top) <= 3 and max(top, key=top.get) == tok


def test_n_choices_share_one_prefill(client):
    before = metric("chorus_prompt_tokens_total")
    r = chat(client, "Name an animal.", n=4, temperature=1, seed=5, max_tokens=10)
    after = metric("chorus_prompt_tokens_total")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 4, texts
    assert after - before == r.usage.prompt_tokens
    # Each choice's tokens are counted; the prompt once.
    single = chat(client, "Name an animal.", temperature=1, seed=5, max_tokens=10)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    assert r.usage.completion_tokens >= 4


def test_choice_i_is_the_request_seeded_seed_plus_i(client):
    # The forked choices start from the shared KV blocks: they must decode exactly as a
    # request of their own with their seed.
    r = chat(client, "Write a short line about rain.", n=3, temperature=1, seed=40, max_tokens=16)
    for i, c in enumerate(r.choices):
        alone = chat(client, "Write a short line about rain.", temperature=1, seed=40 + i, max_tokens=16)
        assert c.message.content == alone.choices[0].message.content


def test_n_choices_stream(client):
    stream = chat(client, "Say hello.", n=3, temperature=1, seed=2, max_tokens=8, stream=True,
                  stream_options={"include_usage": True})
    texts, finished, usage = ["", "", ""], set(), None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}
    assert all(texts)
    assert usage.completion_tokens >= 3


def test_continuous_usage_stats_count_each_choice_as_it_goes(client):
    # vLLM's `continuous_usage_stats`: every chunk carries its choice's usage so far.
    options = {"include_usage": True, "continuous_usage_stats": True}
    stream = chat(client, "Say hello.", n=2, temperature=1, seed=3, max_tokens=8, stream=True,
                  stream_options=options)
    seen, last, total = {0: [], 1: []}, None, None
    for chunk in stream:
        if not chunk.choices:
            total = chunk.usage
            continue
        for c in chunk.choices:
            assert chunk.usage is not None, chunk
            seen[c.index].append(chunk.usage.completion_tokens)
            # What the prefix cache served is known only at the end.
            assert chunk.usage.prompt_tokens_details is None, chunk.usage
            last = chunk.usage
    assert last.prompt_tokens == total.prompt_tokens
    assert total.prompt_tokens_details is not None
    for counts in seen.values():
        assert counts[0] == 0 and counts == sorted(counts), counts
    # Each choice's last chunk counts all its tokens; the totals add them up.
    assert seen[0][-1] + seen[1][-1] == total.completion_tokens, (seen, total)
    # A batch of prompts: each choice with its own prompt's length.
    stream = client.completions.create(model=MODEL, prompt=["Hi", "Once upon a time there was"],
                                       max_tokens=3, stream=True, stream_options=options)
    prompts = {}
    for chunk in stream:
        for c in chunk.choices:
            prompts[c.index] = chunk.usage.prompt_tokens
    assert prompts[0] < prompts[1], prompts
    # Without `include_usage`, no usage at all; with it alone, only the last chunk's.
    plain = chat(client, "Say hello.", max_tokens=3, stream=True,
                 stream_options={"continuous_usage_stats": True})
    assert all(chunk.usage is None for chunk in plain)
    chunks = list(chat(client, "Say hello.", max_tokens=3, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_penalties_reduce_repetition(client):
    prompt = "banana banana banana banana banana banana banana banana"

    def count(**kw):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, **kw)
        return r.choices[0].text.count("banana")

    plain = count()
    assert plain >= 20
    assert count(frequency_penalty=1.0) < plain / 2
    assert count(presence_penalty=1.5) < plain
    assert count(extra_body={"repetition_penalty": 1.3}) < plain / 2


def test_logit_bias(client):
    greedy = client.completions.create(model=MODEL, prompt="The capital of France is",
                                       max_tokens=1, temperature=0, logprobs=0)
    first = greedy.choices[0].logprobs.tokens[0]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is",
                                       max_tokens=1, temperature=0, logprobs=0,
                                       logit_bias={str(token_id(first)): -100})
    assert banned.choices[0].logprobs.tokens[0] != first
    forced = client.completions.create(model=MODEL, prompt="The capital of France is",
                                       max_tokens=3, temperature=0,
                                       logit_bias={str(token_id(" banana")): 100})
    assert forced.choices[0].text == " banana banana banana"


def test_min_tokens_and_stop_token_ids(client):
    short = chat(client, "Reply with just the word OK.", max_tokens=60, temperature=0)
    assert short.choices[0].finish_reason == "stop"
    n = short.usage.completion_tokens
    longer = chat(client, "Reply with just the word OK.", max_tokens=60, temperature=0,
                  extra_body={"min_tokens": n + 10})
    assert longer.usage.completion_tokens >= n + 10
    # Stop strings, too, wait for min_tokens (as in vLLM).
    with_stop = chat(client, "Reply with just the word OK.", max_tokens=60, temperature=0,
                     stop=["OK", "."], extra_body={"min_tokens": n + 10})
    assert with_stop.usage.completion_tokens >= n + 10

    # A stop string begun by token min_tokens and completed after it ends the answer
    # where it began: its start is held back, as any stop string's (vLLM's result).
    free = client.completions.create(model=MODEL, prompt="The capital of France is",
                                     max_tokens=6, temperature=0, logprobs=0)
    tokens = free.choices[0].logprobs.tokens
    stop = tokens[1][-1] + tokens[2]
    assert stop not in tokens[0] + tokens[1], tokens
    for min_tokens, expected in [(2, tokens[0] + tokens[1][:-1]),
                                 (3, "".join(tokens[:3]))]:
        for stream in (False, True):
            r = client.completions.create(model=MODEL, prompt="The capital of France is",
                                          max_tokens=6, temperature=0, stop=[stop],
                                          stream=stream, extra_body={"min_tokens": min_tokens})
            text = "".join(c.choices[0].text for c in r if c.choices) if stream \
                else r.choices[0].text
            assert text.startswith(expected), (min_tokens, stream, text, tokens)
            if min_tokens == 2:
                assert text == expected, (stream, text, tokens)

    # vLLM's include_stop_str_in_output: the stop string found ends the text.
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=6, temperature=0, stop=[stop], stream=stream,
                                      extra_body={"include_stop_str_in_output": True})
        text = "".join(c.choices[0].text for c in r if c.choices) if stream \
            else r.choices[0].text
        assert text == tokens[0] + tokens[1] + tokens[2], (stream, text, tokens)

    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                  temperature=0)
    assert " Paris" in r.choices[0].text
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is",
                                        max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": [token_id(" Paris")]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == r.choices[0].text.split(" Paris")[0]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "height_m", "role", "address", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}


def test_fifty_json_schema_replies_all_validate(client):
    def one(seed):
        r = chat(client, "Describe a user account as JSON.", max_tokens=200, temperature=1,
                 seed=seed, response_format=FORMAT)
        return r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(50)))
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_streamed_structured_output_is_valid_json(client):
    stream = chat(client, "Describe a user account as JSON.", max_tokens=200, temperature=0.8,
                  seed=3, response_format=FORMAT, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_mode(client):
    r = chat(client, "Give me a JSON object about a cat.", max_tokens=120, temperature=0,
             response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_echo(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5,
                                  temperature=0, echo=True)
    assert r.choices[0].text.startswith("Once upon a time")
    assert len(r.choices[0].text) > len("Once upon a time")


@pytest.mark.parametrize(
    "field,kw",
    [
        ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
        ("n", {"n": 0}),
        ("n", {"n": 9}),
        ("presence_penalty", {"presence_penalty": 3}),
        ("frequency_penalty", {"frequency_penalty": -2.5}),
        ("repetition_penalty", {"extra_body": {"repetition_penalty": 0}}),
        ("logit_bias", {"logit_bias": {"99999999": 1}}),
        ("logit_bias", {"logit_bias": {"5": 150}}),
        ("min_tokens", {"max_tokens": 5, "extra_body": {"min_tokens": 6}}),
        ("stop_token_ids", {"extra_body": {"stop_token_ids": [-1]}}),
        ("response_format", {"response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
        ("response_format", {"response_format": {"type": "yaml"}}),
    ],
)
def test_bad_values_are_400s_naming_the_field(client, field, kw):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "hi", **kw)
    assert e.value.body["param"] == field, e.value.body
    assert field in e.value.body["message"] or field == "response_format"


def test_completion_offsets_of_split_characters_agree_streamed_or_not(client):
    # This vocabulary is byte-level: 你 and 🎉 come in pieces. A piece is named by its
    # bytes, starts where its character does, and offsets never go back or past the text.
    for echo in (False, True):
        args = dict(model=MODEL, prompt="你好, 🎉 emoji:", max_tokens=12, temperature=0,
                    logprobs=2, echo=echo)
        whole = client.completions.create(**args).choices[0]
        lp = whole.logprobs
        assert any(t.startswith("bytes:\\x") for t in lp.tokens), lp.tokens
        assert lp.text_offset == sorted(lp.text_offset)
        assert max(lp.text_offset) < len(whole.text)
        text, tokens, offsets = "", [], []
        for chunk in client.completions.create(stream=True, **args):
            if chunk.choices:
                text += chunk.choices[0].text
                if chunk.choices[0].logprobs:
                    tokens += chunk.choices[0].logprobs.tokens
                    offsets += chunk.choices[0].logprobs.text_offset
        assert text == whole.text
        assert tokens == lp.tokens
        assert offsets == lp.text_offset


def test_completion_alternatives_always_hold_the_chosen_token(client):
    # OpenAI: "the API will always return the logprob of the sampled token, so there may
    # be up to logprobs+1 elements".
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                  temperature=2, seed=3, logprobs=1)
    lp = r.choices[0].logprobs
    for token, score, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and top[token] == score
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=2, echo=True,
                                  logprobs=0)
    lp = r.choices[0].logprobs
    assert lp.top_logprobs[0] is None
    assert all(top == {t: s} for t, s, top in
               zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]))


def test_odd_but_valid_shapes_and_clear_refusals(client):
    # An assistant's refusal part (the SDK's types allow it) is history like any text.
    r = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
        {"role": "user", "content": "Why?"}])
    assert r.choices[0].finish_reason == "length"

    def refused(path, body, param):
        with pytest.raises(openai.BadRequestError) as e:
            client.post(path, body={"model": MODEL, "max_tokens": 2, **body}, cast_to=object)
        assert e.value.body["param"] == param, e.value.body
        assert "untagged" not in e.value.body["message"], e.value.body
        return e.value.body["message"]

    assert "list of strings" in refused("/chat/completions", {"messages": [
        {"role": "user", "content": "Hi"}], "stop": [1, 2]}, "stop")
    assert "content parts" in refused("/chat/completions", {"messages": [
        {"role": "user", "content": 5}]}, "messages")
    refused("/completions", {"prompt": {"x": 1}}, "prompt")
    assert "`tools[0].function` is required" in refused("/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]},
        "tools")
    # A schema the engine cannot enforce is blamed on its function, by field and name.
    spell = {"type": "function", "function": {"name": "spell", "parameters": {
        "type": "object", "properties": {"word": {"type": "string", "pattern": "(a|b)\\1"}}}}}
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    message = refused("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                            "tools": [weather, spell]}, "tools")
    assert '`tools[1].function.parameters` (function "spell")' in message, message
    assert "backreferences" in message, message
    # One sample per choice: `best_of` other than 1 is refused, not silently ignored.
    refused("/completions", {"prompt": "Hi", "best_of": 2}, "best_of")
    refused("/completions", {"prompt": "Hi", "best_of": 0}, "best_of")
    ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, best_of=1)
    assert ok.choices[0].text is not None


def test_echo_with_logprobs_scores_the_prompt(client):
    prompt = "The capital of France is Paris"

    def echoed():
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                         echo=True, logprobs=2)

    r = echoed()
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(prompt)
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "".join(lp.tokens) == c.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    # The prompt's " Paris" is scored exactly as generation scores it after the same text.
    paris = r.usage.prompt_tokens - 1
    assert lp.tokens[paris] == " Paris"
    gen = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1,
                                    temperature=0, logprobs=2)
    assert gen.choices[0].logprobs.tokens[0] == " Paris"
    assert abs(gen.choices[0].logprobs.token_logprobs[0] - lp.token_logprobs[paris]) < 1e-5
    # Scored again although the prefix cache now holds the prompt.
    assert echoed().choices[0].logprobs.token_logprobs == lp.token_logprobs


def test_scoring_a_prompt_alone(client):
    # What evaluation harnesses send: echo, logprobs, and no new tokens.
    prompt = "The capital of France is Paris"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, temperature=0,
                                  echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == prompt and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0
    assert len(c.logprobs.tokens) == r.usage.prompt_tokens
    assert c.logprobs.token_logprobs[0] is None
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_scoring_a_prompt_that_fills_the_context(client):
    # Evaluation harnesses cut their windows to exactly the context: nothing is generated,
    # so nothing needs to be left.
    context = client.models.list().data[0].model_extra["max_model_len"]
    r = client.completions.create(model=MODEL, prompt=[28] * context, max_tokens=0,
                                  echo=True, logprobs=0)
    assert r.usage.prompt_tokens == context
    assert len(r.choices[0].logprobs.token_logprobs) == context
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[28] * (context + 1), max_tokens=0,
                                  echo=True, logprobs=0)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[28] * context, max_tokens=1)
    assert "left to generate" in e.value.body["message"]


def test_text_offsets_place_each_token_in_the_text(client):
    # A special token drawn (pushed by logit_bias) is left out of the text, so it takes
    # no place there; one written in the echoed prompt is the caller's text and does.
    special = "6"
    r = client.completions.create(model=MODEL, prompt="<|im_start|>user\nhi", max_tokens=3,
                                  temperature=0, echo=True, logprobs=0,
                                  logit_bias={special: 100})
    c = r.choices[0]
    drawn = client.post(f"{BASE}/detokenize", body={"tokens": [int(special)]}, cast_to=object)["prompt"]
    assert c.logprobs.tokens[-3:] == [drawn] * 3
    assert c.text == "<|im_start|>user\nhi"
    for token, offset in zip(c.logprobs.tokens[:-3], c.logprobs.text_offset):
        assert c.text[offset:].startswith(token), (token, offset, c.text)
    assert c.logprobs.text_offset[-3:] == [len(c.text)] * 3


def test_echo_with_logprobs_streamed(client):
    prompt = "Once upon a time"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                            echo=True, logprobs=1, stream=True))
    first = chunks[0].choices[0]
    assert first.text == prompt
    assert first.logprobs.token_logprobs[0] is None
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    tokens = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
              for t in ch.choices[0].logprobs.tokens]
    assert "".join(tokens) == text


def test_suffix_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, suffix="end")
    assert e.value.body["param"] == "suffix"
