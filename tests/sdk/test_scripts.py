"""The measuring scripts against real servers: scripts/perplexity.py scores English text
through the default server (a broken kernel shows as a perplexity in the thousands), and
scripts/random-gguf.py writes a model of a chosen shape that chorus loads and serves."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_responses_store import Server

ROOT = Path(__file__).resolve().parents[2]
URL = os.environ.get("CHORUS_URL", "http://127.0.0.1:8080")


def test_perplexity_of_english_text_is_a_language_models(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "benches/data/perplexity.txt").read_text()[:6000])
    out = tmp_path / "ppl.json"
    run = subprocess.run(
        [sys.executable, ROOT / "scripts/perplexity.py", "--url", URL, "--text", text,
         "--ctx", "128", "--json", out],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "[1/" in run.stderr  # progress per window
    result = json.loads(out.read_text())
    assert result["windows"] == result["tokens"] // 128 >= 5
    assert result["scored"] == result["windows"] * (128 - 65)  # tokens 65..127 of each
    # SmolLM2-135M scores this licence text at ~17 with 512-token windows; with 128 a
    # little higher. Random guessing over its vocabulary would be ~49,000.
    assert 3 < result["perplexity"] < 60, result


def test_random_gguf_of_a_chosen_shape_is_served(tmp_path):
    model = tmp_path / "tiny.gguf"
    run = subprocess.run(
        [sys.executable, ROOT / "scripts/random-gguf.py", "--out", model, "--hidden", "128",
         "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "256"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "layer 2/2" in run.stderr
    server = Server(tmp_path, "--model", str(model), "--no-store")
    try:
        models = server.client.models.list()
        assert models.data[0].id == "tiny"
        r = server.client.completions.create(model="tiny", prompt="Hello", max_tokens=8,
                                             temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 8
    finally:
        server.stop()
