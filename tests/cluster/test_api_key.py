"""A cluster whose workers are behind an API key (scripts/cluster.sh with --api-key):
the router is given the key, finds and health-checks the workers with it, serves
clients that send it, and refuses those that do not."""

import openai
import pytest

from harness import MODEL, WORKER_FLAGS, Cluster

KEY = "cluster-test-key"


def test_a_keyed_cluster_starts_and_asks_clients_for_the_key():
    # Before the fix the script waited for the router forever: smg could not read the
    # workers' /v1/models without the key, and the script polled smg's /workers without it.
    with Cluster(1, flags=[*WORKER_FLAGS, "--api-key", KEY]) as cluster:
        keyed = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=KEY, max_retries=0,
                              timeout=120)
        r = keyed.chat.completions.create(model=MODEL, max_tokens=2,
                                          messages=[{"role": "user", "content": "Hi"}])
        assert r.choices[0].finish_reason == "length"
        with pytest.raises(openai.AuthenticationError):
            cluster.client.chat.completions.create(
                model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
