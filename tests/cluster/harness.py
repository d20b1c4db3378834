"""A chorus cluster for tests: scripts/cluster.sh with N workers behind an smg router on
loopback, its workers' addresses and processes, and conversations run through it with
the official openai SDK (each turn resending the whole history)."""

import concurrent.futures
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request

import openai

BIN = os.environ.get("CHORUS_BIN", "target/release/chorus")
MODEL = "smollm2-135m-instruct"
# One compute thread each: three workers share this machine's two cores.
WORKER_FLAGS = ["--threads", "1", "--no-store", "--shutdown-grace", "20"]
# Health checked every second, one failure marks a worker unhealthy and one success
# brings it back; loads read every second.
ROUTER_FLAGS = ("--health-check-interval-secs 1 --health-failure-threshold 1 "
                "--health-success-threshold 1 --load-monitor-interval 1")
# The header smg puts on every response: the worker that served it.
ROUTED = "x-smg-routed-worker-id"


# What the tests measured, shared between test files of one pytest run and written as
# JSON to $CLUSTER_REPORT when that is set.
REPORT = {}


def save_report(**measured):
    REPORT.update(measured)
    path = os.environ.get("CLUSTER_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(REPORT, f, indent=2)


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


class Cluster:
    """scripts/cluster.sh N, started on enter and stopped (SIGTERM) on exit."""

    def __init__(self, n, policy="cache_aware", flags=WORKER_FLAGS):
        self.n, self.policy, self.flags = n, policy, list(flags)
        self.dir = tempfile.mkdtemp(prefix="chorus-cluster-")
        self.extra = []  # processes the test started itself (restarted workers)

    def __enter__(self):
        env = dict(os.environ, CLUSTER_DIR=self.dir, CLUSTER_POLICY=self.policy,
                   CHORUS_BIN=BIN, SMG_ARGS=ROUTER_FLAGS, CLUSTER_TIMEOUT="180")
        self.log = open(os.path.join(self.dir, "cluster.err"), "w")
        self.proc = subprocess.Popen(["scripts/cluster.sh", str(self.n), *self.flags],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.proc.wait(timeout=60)
            raise AssertionError(f"no router URL; see {self.dir}/cluster.err")
        self.url = line
        self.workers = {}
        with open(os.path.join(self.dir, "workers")) as f:
            for row in f:
                url, pid = row.split()
                self.workers[url] = int(pid)
        assert len(self.workers) == self.n
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused",
                                    max_retries=0, timeout=120)
        return self

    def __exit__(self, *exc):
        for p in self.extra:
            p.terminate()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for p in self.extra:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.log.close()

    def router_workers(self):
        """The router's view: worker URL -> (is_healthy, status)."""
        return {w["url"]: (w["is_healthy"], w["status"])
                for w in get_json(f"{self.url}/workers")["workers"]}

    def wait_for(self, what, predicate, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.25)
        raise AssertionError(f"{what}: not after {timeout} s; router says "
                             f"{self.router_workers()}")

    def restart(self, url):
        """Starts a worker again on `url`'s port, as the one that was stopped."""
        port = url.rsplit(":", 1)[1]
        log = open(os.path.join(self.dir, f"restart-{port}.log"), "w")
        p = subprocess.Popen([BIN, "--host", "127.0.0.1", "--port", port, *self.flags],
                             stdout=log, stderr=subprocess.STDOUT)
        self.extra.append(p)
        self.workers[url] = p.pid
        return p


def metric(url, name):
    """The sum of one metric's samples on a worker's /metrics (`name` may end with a
    label set, to take those samples only)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + ("" if name.endswith("}") else "{")) or \
                line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


# The multi-turn workload: conversations, each of turns resending its history.
CONVERSATIONS, TURNS = 12, 5
TOPICS = ["rivers", "volcanoes", "bread", "chess", "bees", "lighthouses", "glass",
          "trains", "maps", "tea", "owls", "bridges", "clocks", "salt", "kites", "moss"]
FOLLOW_UPS = [
    "Tell me one more fact about that, and explain why it matters to people today.",
    "How would you explain that to a ten-year-old who has never heard of it before?",
    "What is a common misunderstanding about this, and what is actually true instead?",
    "Summarise everything we have said so far in two short sentences, please.",
]


def opening(i, salt):
    topic = TOPICS[i % len(TOPICS)]
    return (f"[{salt} #{i}] I would like to learn about {topic}. Start with the most "
            f"surprising thing you know about {topic}, in a few sentences.")


def conversation(client, i, salt, turns, max_tokens=24):
    """Runs one conversation of `turns` turns, each resending the history; returns one
    (worker, prompt_tokens, cached_tokens) per turn."""
    messages = [{"role": "user", "content": opening(i, salt)}]
    served = []
    for t in range(turns):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
        reply = raw.parse()
        usage = reply.usage
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        served.append((raw.headers.get(ROUTED), usage.prompt_tokens, cached))
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        if t + 1 < turns:
            messages.append({"role": "user", "content": FOLLOW_UPS[t % len(FOLLOW_UPS)]})
    return served


def run_conversations(client, n, salt, turns, parallel=6):
    """`n` conversations, `parallel` at a time; returns each one's turns."""
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda i: conversation(client, i, salt, turns), range(n)))


def hit_rate(results, first_turn=1):
    """Cached over prompt tokens, summed over turns `first_turn`... (0-based)."""
    prompt = sum(p for turns in results for (_, p, _) in turns[first_turn:])
    cached = sum(c for turns in results for (_, _, c) in turns[first_turn:])
    return cached / prompt
