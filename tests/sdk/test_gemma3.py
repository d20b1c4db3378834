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


def _offsets_point_at_tokens(text, lp):
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert text[offset:].startswith(token), (offset, token, text)


def test_echo_offsets_point_at_their_tokens_streamed_or_not(client):
    # Gemma wants a BOS in front of raw prompts; the server adds it, so it is not part of
    # the echoed text and not among the reported tokens (before the fix every offset was
    # shifted by the BOS token's text, and the two modes disagreed).
    prompt = "The Eiffel Tower is located in the city of"
    args = dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1)
    c = client.completions.create(**args).choices[0]
    assert c.text.startswith(prompt)
    assert c.logprobs.tokens[0] == "The"
    assert c.logprobs.text_offset[0] == 0
    # Every echoed token is scored: it follows the BOS.
    assert all(x is not None and x <= 0 for x in c.logprobs.token_logprobs)
    _offsets_point_at_tokens(c.text, c.logprobs)

    chunks = [ch.choices[0] for ch in client.completions.create(stream=True, **args) if ch.choices]
    text = "".join(ch.text for ch in chunks)
    assert text == c.text
    tokens, offsets = [], []
    for ch in chunks:
        if ch.logprobs:
            tokens += ch.logprobs.tokens
            offsets += ch.logprobs.text_offset
    assert tokens == c.logprobs.tokens
    assert offsets == c.logprobs.text_offset


def test_tokenize_takes_vllms_special_token_and_token_string_options():
    import httpx

    def tokenize(body):
        r = httpx.post(f"{BASE}/tokenize", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    prompt = "The Eiffel Tower"
    with_bos = tokenize({"prompt": prompt, "return_token_strs": True})
    assert with_bos["tokens"][0] == 2 and with_bos["token_strs"][0] == "<bos>"
    assert len(with_bos["token_strs"]) == with_bos["count"]
    plain = tokenize({"prompt": prompt, "add_special_tokens": False})
    assert plain["tokens"] == with_bos["tokens"][1:]
    assert "token_strs" not in plain
    # Messages: the template writes BOS; asking for special tokens adds none twice.
    messages = [{"role": "user", "content": "Hi"}]
    chat = tokenize({"messages": messages})
    assert chat["tokens"][0] == 2
    assert tokenize({"messages": messages, "add_special_tokens": True}) == chat
