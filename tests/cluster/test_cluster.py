"""Three chorus workers behind smg (scripts/cluster.sh) on loopback: conversations stay on
the worker that caches them, distinct requests spread, streaming and usage pass through
unchanged, a killed worker's streams end with an error and the others take over, a
restarted one rejoins, and SIGTERM drains a worker while the router sends work elsewhere.

Set CLUSTER_REPORT=FILE to have what was measured written there as JSON."""

import concurrent.futures
import os
import signal
import threading
import time

import openai
import pytest

from harness import (CONVERSATIONS, MODEL, ROUTED, TURNS, Cluster, hit_rate, metric,
                     run_conversations, save_report)


@pytest.fixture(scope="module")
def cluster():
    with Cluster(3) as c:
        yield c


def test_router_sees_every_worker_ready(cluster):
    workers = cluster.router_workers()
    assert set(workers) == set(cluster.workers)
    assert all(healthy and status == "ready" for healthy, status in workers.values()), workers
    models = cluster.client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_cache_aware_keeps_each_conversation_on_one_worker(cluster):
    chats = 'chorus_requests_total{endpoint="/v1/chat/completions",status="200"}'
    before = {u: metric(u, chats) for u in cluster.workers}
    results = run_conversations(cluster.client, CONVERSATIONS, "aware", TURNS)
    for i, turns in enumerate(results):
        workers = {w for (w, _, _) in turns}
        assert len(workers) == 1 and None not in workers, f"conversation {i}: {turns}"
    # The workers' own counters agree with the router's header.
    counted = {u: metric(u, chats) - before[u] for u in cluster.workers}
    routed = {u: sum(1 for turns in results for (w, _, _) in turns if w == u)
              for u in cluster.workers}
    assert counted == routed, (counted, routed)
    cluster_rate = hit_rate(results)

    # The same workload (other texts, so nothing is cached yet) sent to one server.
    single_url = next(iter(cluster.workers))
    single = openai.OpenAI(base_url=f"{single_url}/v1", api_key="unused", max_retries=0)
    single_rate = hit_rate(run_conversations(single, CONVERSATIONS, "single", TURNS))
    save_report(cache_aware_hit_rate=cluster_rate, single_server_hit_rate=single_rate,
                cache_aware_requests_per_worker=sorted(routed.values()))
    print(f"\nturns 2-{TURNS} prompt tokens from the prefix cache: cluster (cache_aware) "
          f"{cluster_rate:.3f}, one server {single_rate:.3f}; requests per worker "
          f"{sorted(routed.values())}")
    assert cluster_rate >= 0.9 * single_rate, (cluster_rate, single_rate)


def test_distinct_requests_spread_over_every_worker(cluster):
    def ask(i):
        raw = cluster.client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": f"{i * 7919 % 1000:03d} {i}: name a colour "
                       f"that starts with the letter {chr(ord('a') + i % 26)}."}])
        raw.parse()
        return raw.headers.get(ROUTED)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        served = list(pool.map(ask, range(30)))
    counts = {u: served.count(u) for u in cluster.workers}
    save_report(distinct_requests_per_worker=sorted(counts.values()))
    print(f"\n30 distinct requests per worker: {counts}")
    assert sum(counts.values()) == 30, served
    assert all(c > 0 for c in counts.values()), counts


def test_streaming_usage_and_sdk_through_the_router(cluster):
    stream = cluster.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert finish == "length" and usage.completion_tokens == 12, (finish, usage)
    # The same request unstreamed gives the same greedy text and usage.
    full = cluster.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12, temperature=0)
    assert full.choices[0].message.content == text
    assert full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens == usage.prompt_tokens


def stream_until_end(client, content, max_tokens, started=None):
    """Streams one request; returns (worker, events, text, error, finish_reason)."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    worker = raw.headers.get(ROUTED)
    text, error, finish, events = "", None, None, 0
    try:
        for chunk in raw.parse():
            events += 1
            if started is not None and events == 3:
                started.set()
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
    except openai.APIError as e:
        error = e
    return worker, events, text, error, finish


def test_sigkill_ends_that_workers_streams_others_carry_on_and_it_rejoins(cluster):
    # A few long streams, so that one worker at least is serving one.
    starts = [threading.Event() for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream_until_end, cluster.client,
                               f"Stream {i}: write a long story about a {t}.", 400, starts[i])
                   for i, t in enumerate(["fox", "ship", "garden"])]
        for s in starts:
            assert s.wait(60), "a stream did not start"
        busy = [u for u in cluster.workers if metric(u, "vllm:num_requests_running") > 0]
        assert busy, "no worker is running a stream"
        victim = busy[0]
        t0 = time.time()
        os.kill(cluster.workers[victim], signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
    for worker, events, text, error, finish in results:
        if worker == victim:
            # Ended, and not as if it were complete: an error, never a hang.
            assert error is not None or finish is None, (events, finish)
            assert time.time() - t0 < 60
        else:
            assert error is None and finish == "length", (worker, error, finish)
    assert any(w == victim for (w, *_rest) in results)

    # New requests succeed on the others meanwhile.
    for i in range(6):
        r = cluster.client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=3, messages=[{"role": "user", "content": f"After {i}: hi"}])
        r.parse()
        assert r.headers.get(ROUTED) != victim
    cluster.wait_for("the killed worker is marked unhealthy",
                     lambda: cluster.router_workers()[victim][0] is False)

    # Back on the same address, it is healthy again and gets work.
    cluster.restart(victim)
    cluster.wait_for("the restarted worker rejoins",
                     lambda: cluster.router_workers()[victim][0] is True, timeout=90)
    got = 0
    for i in range(30):
        r = cluster.client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=2,
            messages=[{"role": "user", "content": f"{i} rejoin {i * 31}: say yes"}])
        r.parse()
        got += r.headers.get(ROUTED) == victim
        if got:
            break
    assert got, "no request reached the restarted worker"


def test_sigterm_drains_a_worker_while_the_router_sends_work_elsewhere(cluster):
    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream_until_end, cluster.client,
                             "Drain: describe a long walk through a city at night.", 120, started)
        assert started.wait(60)
        busy = [u for u in cluster.workers if metric(u, "vllm:num_requests_running") > 0]
        assert len(busy) == 1, busy
        draining = busy[0]
        os.kill(cluster.workers[draining], signal.SIGTERM)
        # While it drains, new requests are served by the others.
        for i in range(6):
            r = cluster.client.chat.completions.with_raw_response.create(
                model=MODEL, max_tokens=3,
                messages=[{"role": "user", "content": f"During drain {i}: hi"}])
            r.parse()
            assert r.headers.get(ROUTED) != draining
        worker, events, text, error, finish = future.result(timeout=120)
    # The running stream was finished, whole.
    assert worker == draining
    assert error is None and finish == "length", (error, finish)
    cluster.wait_for("the drained worker is marked unhealthy",
                     lambda: cluster.router_workers()[draining][0] is False)
