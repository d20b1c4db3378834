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


def test_a_log_that_cannot_be_written_does_not_stop_the_server(tmp_path):
    """stderr closed under the server (a log pipe whose reader died): requests are still
    served. Before the fix the first log line that failed panicked the thread that wrote
    it, the inference thread among them, and the live process answered nothing."""
    import os
    import subprocess
    import urllib.request

    from test_responses_store import BIN, free_port

    port = free_port()
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([BIN, "--port", str(port), "--no-store", "--kv-cache-mb", "64"],
                            stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "chorus did not start"
            try:
                if urllib.request.urlopen(f"{url}/health").status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        os.close(read_end)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        for _ in range(6):
            assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
