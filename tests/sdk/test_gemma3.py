"""The official `openai` SDK against chorus serving gemma3-270m (CHORUS_GEMMA_URL): a
second architecture and tokenizer family through the same API. gemma3-270m is a
pretrained (not instruction-tuned) model, so the answers checked are completions."""

import os

import openai
import pytest

BASE = os.environ.get("CHORUS_GEMMA_URL")
MODEL = "gemma3-270m"

pytestmark = pytest.mark.skipif(BASE is None, reason="CHORUS_GEMMA_URL is not set")


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_knows_paris(client):
    r = client.completions.create(
        model=MODEL,
        prompt="The Eiffel Tower is located in the city of",
        max_tokens=8,
        temperature=0,
    )
    assert "Paris" in r.choices[0].text
    # BOS plus nine pieces: raw prompts get the BOS token Gemma expects.
    assert r.usage.prompt_tokens == 10


def test_chat_uses_the_gemma_turn_format(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    # <bos><start_of_turn>user\n … <end_of_turn>\n<start_of_turn>model\n
    assert r.usage.prompt_tokens == 16
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Bonjour ! Comment ça va ?"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None and 1 <= usage.completion_tokens <= 10
    assert len(text) > 0
