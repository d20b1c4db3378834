"""Signals to a real chorus process (CHORUS_BIN): SIGTERM drains, and a second one
during the drain exits at once, as uvicorn and vLLM do, for an operator who cannot wait
out the grace period."""

import signal
import time

import httpx

from test_responses_store import MODEL, Server


def test_a_second_sigterm_during_the_drain_exits_at_once(tmp_path):
    server = Server(tmp_path, "--shutdown-grace", "120", "--no-store")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 4000, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                          timeout=120) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(1)
            assert server.proc.poll() is None, "the first SIGTERM must drain, not exit"
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = server.proc.wait(timeout=20)
        assert code == 130
        assert time.monotonic() - sent < 5
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.log.close()
