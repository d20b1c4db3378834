"""The measuring scripts against real servers: scripts/perplexity.py scores English text
through the default server (a broken kernel shows as a perplexity in the thousands), and
scripts/random-gguf.py writes a model of a chosen shape that chorus loads and serves, and
scripts/step-profile.py reads a real server's step log."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


def test_step_profile_reads_a_servers_step_log(tmp_path, monkeypatch):
    monkeypatch.setenv("RUST_LOG", "info,chorus::step=debug")
    monkeypatch.setenv("CHORUS_LOG_FORMAT", "json")
    server = Server(tmp_path, "--no-store", "--max-step-ms", "100")
    try:
        model = server.client.models.list().data[0].id

        def ask(words):
            return server.client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "word " * words}],
                max_tokens=24, temperature=0, extra_body={"ignore_eos": True})

        # Streams decoding while longer prompts are prefilled beside them.
        with ThreadPoolExecutor(4) as pool:
            for r in pool.map(ask, [10, 10, 300, 600]):
                assert r.usage.completion_tokens == 24
    finally:
        server.stop()
    run = subprocess.run(
        [sys.executable, ROOT / "scripts/step-profile.py", server.log.name],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    # 4 × 24 tokens drawn: at least 24 steps, most of them with decoders.
    steps = int(out.split(" steps,")[0])
    assert steps >= 24, out
    assert "decode only" in out and "decode + prefill chunk" in out, out
    assert "step ms ≈" in out, out
