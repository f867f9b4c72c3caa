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

#: submodule -> the public names it defines
_BY_MODULE: dict[str, tuple[str, ...]] = {
    "metrics": ("MetricsCollector", "DEFAULT_SECONDS_BUCKETS"),
    "metrics_hook": ("MetricsHook", "instrument"),
    "server": ("start_metrics_server", "MetricsServer"),
    "events": ("KVEventStream", "KVEventGapError"),
    "event_types": ("KVEvent", "BlockStored", "BlockRemoved", "AllBlocksCleared"),
    "event_index": ("CacheIndex", "replay"),
    "event_json": ("event_to_dict", "event_from_dict", "events_to_jsonl", "events_from_jsonl"),
    # vLLM's wire format over ZMQ (the [events] extra: pyzmq, msgspec)
    "vllm_zmq": ("VLLMEventPublisher",),
    "vllm_subscriber": ("VLLMEventSubscriber",),
    "shadow": ("ShadowCache", "EventRecorder", "read_recording", "iter_recording"),
    "listen_metrics": ("SubscriberCollector",),
}
_LAZY = {name: sub for sub, names in _BY_MODULE.items() for name in names}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
