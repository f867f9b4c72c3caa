"""Observability: Prometheus metrics and a KV-event stream for a ``KVPool``.

Two hooks (``hooks.PoolHook`` subclasses) turn pool events into outputs::

    KVPool --hook calls--> MetricsHook  --plain ints, scrape-time fold--> MetricsCollector
                                                                          (own CollectorRegistry)
                                                                               |
                                                       start_metrics_server / collector.render()
    KVPool --hook calls--> KVEventStream --BlockStored/BlockRemoved/AllBlocksCleared-->
                           ring buffer (events_since), subscribers, JSON lines, replay()

Quick use::

    from sagellm_kv_cache.observability import instrument, start_metrics_server
    collector = instrument(pool, name="gpu0")          # attaches a MetricsHook
    server = start_metrics_server(9400, registry=collector.registry)
    ...
    server.shutdown()

    KVEventStream.publish_vllm --vLLM wire format (vllm_wire)--> VLLMEventPublisher (ZMQ XPUB + ROUTER)
    engine's ZMQ PUB --> VLLMEventSubscriber --gap repair via replay--> ShadowCache, EventRecorder
                                                                    (Parquet), SubscriberCollector

``prometheus_client`` is imported only when the metrics part is used; the
event stream needs nothing beyond the standard library; the vLLM wire format
needs the ``[events]`` extra (pyzmq, msgspec), imported when first used.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_LAZY: dict[str, str] = {
    "MetricsCollector": "metrics",
    "MetricsHook": "metrics_hook",
    "instrument": "metrics_hook",
    "DEFAULT_SECONDS_BUCKETS": "metrics",
    "start_metrics_server": "server",
    "MetricsServer": "server",
    "KVEventStream": "events",
    "KVEvent": "event_types",
    "BlockStored": "event_types",
    "BlockRemoved": "event_types",
    "AllBlocksCleared": "event_types",
    "KVEventGapError": "events",
    "CacheIndex": "event_index",
    "replay": "event_index",
    "event_to_dict": "event_json",
    "event_from_dict": "event_json",
    "events_to_jsonl": "event_json",
    "events_from_jsonl": "event_json",
    # vLLM's wire format over ZMQ (the [events] extra: pyzmq, msgspec)
    "VLLMEventPublisher": "vllm_zmq",
    "VLLMEventSubscriber": "vllm_subscriber",
    "ShadowCache": "shadow",
    "EventRecorder": "shadow",
    "read_recording": "shadow",
    "iter_recording": "shadow",
    "SubscriberCollector": "listen_metrics",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
