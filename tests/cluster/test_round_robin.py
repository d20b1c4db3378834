"""The multi-turn workload of test_cluster.py through a round_robin router: turns of one
conversation land on different workers, so less of each prompt comes from a prefix
cache than with cache_aware (run after test_cluster.py, which measured that)."""

import pytest

from harness import CONVERSATIONS, REPORT, TURNS, Cluster, hit_rate, run_conversations, save_report


def test_round_robin_spreads_conversations_and_caches_less():
    if "cache_aware_hit_rate" not in REPORT:
        pytest.skip("compares with test_cluster.py's cache_aware run; run the directory")
    with Cluster(3, policy="round_robin") as cluster:
        results = run_conversations(cluster.client, CONVERSATIONS, "robin", TURNS)
    spread = sum(1 for turns in results if len({w for (w, _, _) in turns}) > 1)
    rate = hit_rate(results)
    aware = REPORT["cache_aware_hit_rate"]
    save_report(round_robin_hit_rate=rate, round_robin_conversations_spread=spread)
    print(f"\nturns 2-{TURNS} prompt tokens from the prefix cache: round_robin {rate:.3f}, "
          f"cache_aware {aware:.3f}; {spread} of {CONVERSATIONS} conversations on more than "
          f"one worker")
    assert spread > CONVERSATIONS // 2, results
    # Measurably lower: at least a tenth of the cache-aware figure below it.
    assert rate < 0.9 * aware, (rate, aware)
