"""The Grafana dashboard in the repo queries only series the exposition has."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import make_pool
from prometheus_client.parser import text_string_to_metric_families

from sagellm_kv_cache.observability import MetricsCollector, MetricsHook, SubscriberCollector
from sagellm_kv_cache.observability.vllm_subscriber import VLLMEventSubscriber

DASHBOARD = (
    Path(__file__).resolve().parent.parent
    / "sagellm_kv_cache/observability/grafana/sagellm_kv_dashboard.json"
)
_METRIC = re.compile(r"\b((?:sagellm_kv|vllm:)[a-zA-Z0-9_:]*)")
_BY = re.compile(r"\bby \(([^)]*)\)\s*\(")


def exposition_series() -> dict[str, set[str]]:
    """Sample name -> label names, from a pool with traffic and a subscriber."""
    pool = make_pool()
    collector = MetricsCollector(vllm_compat=True, model_name="m")
    pool.add_hook(MetricsHook(collector, pool, name="gpu0"))
    h, _ = pool.alloc_with_prefix(list(range(8)))
    pool.cache_blocks(h)
    pool.free(h)
    sub = VLLMEventSubscriber("tcp://127.0.0.1:1")  # never receives: series exist at 0
    try:
        sub.shadow._get((sub.endpoint, 0, "GPU"))  # one (empty) shadow series
        text = collector.render() + SubscriberCollector([sub]).render()
    finally:
        sub.close()
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def test_vllm_compatible_names_carry_the_token_counts():
    pool = make_pool()
    collector = MetricsCollector(vllm_compat=True, model_name="m")
    pool.add_hook(MetricsHook(collector, pool, name="gpu0"))
    for _ in range(2):
        h, _ = pool.alloc_with_prefix(list(range(10)))
        pool.cache_blocks(h)
        pool.free(h)
    labels = {"model_name": "m", "engine": "gpu0"}
    get = collector.get_sample_value
    assert (
        get("vllm:prefix_cache_queries_total", labels)
        == 20
        == get("sagellm_kv_prefix_cache_queries_total", {"pool": "gpu0"})
    )
    assert get("vllm:prefix_cache_hits_total", labels) == 8  # 2 full blocks of 4
    assert get("vllm:kv_cache_usage_perc", labels) == 0.0
    assert MetricsCollector().get_sample_value("vllm:prefix_cache_hits_total", labels) is None


def test_every_dashboard_query_names_exported_series_and_labels():
    dash = json.loads(DASHBOARD.read_text())
    series = exposition_series()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) == len(dash["panels"]) >= 10
    for expr in exprs:
        names = _METRIC.findall(expr)
        assert names, expr
        for name in names:
            assert name in series, f"{expr}: {name} is not exported"
        labels = set().union(*(series[n] for n in names)) | {"le"}
        for group in _BY.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                assert label in labels, f"{expr}: no label {label!r} on {names}"
