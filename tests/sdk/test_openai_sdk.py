"""The official `openai` Python SDK against a running chorus (CHORUS_URL)."""

import os

import openai
import pytest

BASE = os.environ.get("CHORUS_URL", "http://127.0.0.1:8080")
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_chat_non_stream(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens == 37
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three fruits."}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, content_chunks = "", None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            text += choice.delta.content
            content_chunks += 1
        if choice.finish_reason:
            finish = choice.finish_reason
    assert text
    assert content_chunks > 1
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long poem about the sea."}],
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_stop_string(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0, stop=[" 8"])
    assert r.choices[0].finish_reason == "stop"
    assert "8" not in r.choices[0].text
    assert r.choices[0].text.startswith(" 6, 7,")


def test_same_seed_same_text(client):
    def ask(seed):
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a short story."}],
            max_tokens=24,
            temperature=1.0,
            seed=seed,
        ).choices[0].message.content

    assert ask(7) == ask(7)


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert "Paris" in r.choices[0].text
    assert r.usage.completion_tokens >= 1


def test_completions_stream(client):
    text = ""
    for chunk in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, stream=True):
        if chunk.choices:
            text += chunk.choices[0].text
    assert text


def test_completions_batch_of_prompts(client):
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        for p in prompts
    ]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0, n=2)
    # Prompt i's choices are 2i and 2i + 1, each what the prompt gets alone.
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        assert c.text == alone[c.index // 2].choices[0].text
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)

    texts = ["", "", ""]
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=8,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [a.choices[0].text for a in alone]


def test_completions_batch_names_the_bad_prompt(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[[1, 2], [1, 10**9]], max_tokens=2)
    assert e.value.body["param"] == "prompt[1]"


def test_langchain_completions_llm_batch():
    # LangChain's completions LLM sends its batch as one request with a list of prompts.
    from langchain_openai import OpenAI

    llm = OpenAI(model=MODEL, base_url=f"{BASE}/v1", api_key="unused", temperature=0,
                 max_tokens=8, max_retries=0)
    prompts = ["The capital of France is", "Once upon a time"]
    batched = llm.batch(prompts)
    assert batched == [llm.invoke(p) for p in prompts]
    assert all(t.strip() for t in batched)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_bad_parameter_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1
        )
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_p=1.5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
