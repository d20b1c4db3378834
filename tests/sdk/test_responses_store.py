"""Stored responses across server lifetimes, each test with chorus servers of its own
(CHORUS_BIN, the default model, a fresh --state-dir): a 10-turn conversation by
`previous_response_id` alone whose turns come from the prefix cache and which survives a
restart unchanged; kill -9 in the middle of a stored stream; 200 concurrent stored
requests; --no-store."""

import concurrent.futures
import os
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request

import httpx
import openai
import pytest

BIN = os.environ.get("CHORUS_BIN", "target/release/chorus")
MODEL = "smollm2-135m-instruct"
TURNS = [
    "Hi! I am planning a trip to Norway.",
    "Which city should I visit first?",
    "What food should I try there?",
    "Is it expensive?",
    "How do I get around?",
    "What about the weather in May?",
    "Any museums worth a visit?",
    "And a day trip from there?",
    "What should I pack?",
    "Thanks! Summarise my plan in one sentence.",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, state_dir, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(state_dir, f"server-{self.port}.log"), "w")
        self.proc = subprocess.Popen(
            [BIN, "--port", str(self.port), "--state-dir", str(state_dir), *args],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"chorus exited: see {self.log.name}"
            try:
                if urllib.request.urlopen(f"{self.url}/health").status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("chorus did not become ready")
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused",
                                    max_retries=0, timeout=300)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path


def turn(client, text, previous):
    return client.responses.create(model=MODEL, input=text, previous_response_id=previous,
                                   max_output_tokens=24, temperature=0)


def test_ten_turns_by_previous_response_id_are_cached_and_survive_a_restart(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # Uninterrupted: ten turns on one server.
    server = Server(tmp_path / "a")
    try:
        straight, previous = [], None
        for text in TURNS:
            r = turn(server.client, text, previous)
            straight.append(r)
            previous = r.id
    finally:
        server.stop()
    for before, after in zip(straight, straight[1:]):
        cached = after.usage.input_tokens_details.cached_tokens
        # Everything the earlier turns prompted (whole 16-token blocks) is reused.
        assert cached >= before.usage.input_tokens // 16 * 16, (before.usage, after.usage)
        assert after.usage.input_tokens > before.usage.input_tokens

    # Interrupted: five turns, a restart on the same --state-dir, five more.
    server = Server(tmp_path / "b")
    resumed, previous = [], None
    try:
        for text in TURNS[:5]:
            r = turn(server.client, text, previous)
            resumed.append(r)
            previous = r.id
    finally:
        server.stop()
    server = Server(tmp_path / "b")
    try:
        assert server.client.responses.retrieve(previous).output_text == resumed[-1].output_text
        for text in TURNS[5:]:
            r = turn(server.client, text, previous)
            resumed.append(r)
            previous = r.id
    finally:
        server.stop()
    assert [r.output_text for r in resumed] == [r.output_text for r in straight]
    assert [r.usage.input_tokens for r in resumed] == [r.usage.input_tokens for r in straight]


def test_kill_9_mid_stream_leaves_no_half_written_response(tmp_path):
    server = Server(tmp_path)
    try:
        kept = server.client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=4)
        body = {"model": MODEL, "input": "Write a long story about the sea.",
                "max_output_tokens": 400, "stream": True}
        interrupted = None
        with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=120) as r:
            deltas = 0
            for line in r.iter_lines():
                if line.startswith("data: ") and '"response.created"' in line:
                    interrupted = line.split('"id":"', 1)[1].split('"', 1)[0]
                if line.startswith("data: ") and '"response.output_text.delta"' in line:
                    deltas += 1
                    if deltas == 3:
                        server.proc.kill()
                        break
        server.proc.wait(timeout=30)
        server.log.close()
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    assert interrupted and interrupted.startswith("resp_")
    server = Server(tmp_path)
    try:
        with pytest.raises(openai.NotFoundError):
            server.client.responses.retrieve(interrupted)
        with pytest.raises(openai.NotFoundError):
            server.client.responses.create(model=MODEL, input="go on",
                                           previous_response_id=interrupted)
        assert server.client.responses.retrieve(kept.id).output_text == kept.output_text
        later = turn(server.client, "And now?", kept.id)
        assert later.status in ("completed", "incomplete")
    finally:
        server.stop()
    db = sqlite3.connect(tmp_path / "chorus.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    ids = {row[0] for row in db.execute("SELECT id FROM responses")}
    assert ids == {kept.id, later.id}


def test_200_concurrent_stored_requests_leave_200_rows(tmp_path):
    server = Server(tmp_path, "--max-queue", "512")
    try:
        def one(i):
            return server.client.responses.create(model=MODEL, input=f"Say the number {i}.",
                                                  max_output_tokens=2).id

        with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
            ids = list(pool.map(one, range(200)))
        assert len(set(ids)) == 200
        for rid in ids[::20]:
            assert server.client.responses.retrieve(rid).id == rid
    finally:
        server.stop()
    db = sqlite3.connect(tmp_path / "chorus.sqlite3")
    (count,) = db.execute("SELECT COUNT(*) FROM responses").fetchone()
    assert count == 200


def test_a_store_that_cannot_be_written_still_answers(tmp_path):
    # Another process holds the database's write lock past the busy timeout (as a full
    # disk fails a write): the answer still reaches the client, marked not stored,
    # unstreamed and streamed, and is not retrievable.
    server = Server(tmp_path)
    try:
        lock = sqlite3.connect(tmp_path / "chorus.sqlite3", timeout=0, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        r = server.client.responses.create(model=MODEL, input="hi", max_output_tokens=4)
        assert r.status == "incomplete" and r.output_text, r
        assert r.store is False
        events = list(server.client.responses.create(model=MODEL, input="hi",
                                                     max_output_tokens=4, stream=True))
        assert events[-1].type == "response.incomplete", events[-1]
        assert events[-1].response.store is False
        lock.execute("ROLLBACK")
        lock.close()
        with pytest.raises(openai.NotFoundError):
            server.client.responses.retrieve(r.id)
        # The lock gone, responses are stored again.
        stored = server.client.responses.create(model=MODEL, input="hi", max_output_tokens=4)
        assert stored.store is True
        assert server.client.responses.retrieve(stored.id).id == stored.id
    finally:
        server.stop()


def test_no_store_keeps_nothing_and_refuses_chains(tmp_path):
    server = Server(tmp_path, "--no-store")
    try:
        r = server.client.responses.create(model=MODEL, input="hi", max_output_tokens=4)
        assert r.store is False
        with pytest.raises(openai.NotFoundError):
            server.client.responses.retrieve(r.id)
        with pytest.raises(openai.BadRequestError) as e:
            server.client.responses.create(model=MODEL, input="hi", previous_response_id=r.id)
        assert e.value.body["param"] == "previous_response_id"
    finally:
        server.stop()
    assert not (tmp_path / "chorus.sqlite3").exists()
