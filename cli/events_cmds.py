"""``listen``: subscribe to a vLLM-format KV-event stream, record it, mirror its cache.

Only parses options and calls the library
(:mod:`sagellm_kv_cache.observability.vllm_zmq`, ``shadow``, ``listen_metrics``).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import click

from ._common import int_option, out_option


def status_line(sub: Any, capacity_blocks: int | None = None) -> str:
    """One line of live figures: sequence, batches, occupancy, implied hit ratio, gaps."""
    sh = sub.shadow
    held = sh.num_blocks
    occupancy = f"{held} blocks"
    if capacity_blocks:
        occupancy += f" ({held / capacity_blocks:.1%} of {capacity_blocks})"
    return (
        f"seq {sub.last_seq if sub.last_seq is not None else '-'}  batches {sub.num_batches}  "
        f"held {occupancy}  implied block hit ratio {sh.implied_block_hit_ratio:.1%}  "
        f"gaps {sub.num_gaps} (repaired {sub.num_gaps_repaired}, "
        f"lost {sub.num_gaps_unrecovered})  garbage {sub.num_garbage}"
    )


@click.command("listen")
@click.argument("endpoint")
@out_option(help="Directory for the recording (Parquet parts) and listen_summary.json.")
@click.option(
    "--replay-endpoint",
    default=None,
    help="The publisher's replay (ROUTER) endpoint; gaps are repaired through it.",
)
@click.option("--topic", default="", show_default=True, help="Subscription topic prefix.")
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=0),
    default=None,
    help="Stop after this many seconds (default: until Ctrl-C).",
)
@int_option("--max-batches", help="Stop after this many batches.")
@int_option(
    "--start-seq",
    min=0,
    help="Recover everything from this sequence number on (through the replay socket).",
)
@int_option(
    "--metrics-port",
    min=0,
    max=65535,
    help="Serve Prometheus metrics on this port (0: any free port).",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1",
    show_default=True,
    help="Interface for the metrics endpoint (loopback unless you name another).",
)
@int_option("--capacity-blocks", help="The engine's GPU blocks, to show occupancy as a ratio.")
@int_option("--flush-rows", default=4096, help="Batches buffered before a Parquet part is written.")
@click.option("--quiet", is_flag=True, help="No live line.")
def listen(
    endpoint: str,
    out_dir: Path,
    replay_endpoint: str | None,
    topic: str,
    duration_s: float | None,
    max_batches: int | None,
    start_seq: int | None,
    metrics_port: int | None,
    metrics_addr: str,
    capacity_blocks: int | None,
    flush_rows: int,
    quiet: bool,
) -> None:
    """Record a vLLM KV-event stream, keep its shadow cache, show live figures.

    ENDPOINT is the engine's ZMQ PUB endpoint (vLLM: --kv-events-config
    '{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557",
    "replay_endpoint": "tcp://*:5558"}'). Batches are applied in sequence
    order; holes are repaired through --replay-endpoint (or counted). The
    recording (OUT/events-NNNNN.parquet) keeps every batch's payload byte for
    byte with its arrival time; convert it with traces.kv_events. A line of
    figures is printed at most once a second; the hit ratio shown is the
    event-implied one (reuse of held parents by stored chains; requests that
    hit every block publish nothing).

    \b
    Examples:
      sage-kv-stats listen tcp://127.0.0.1:5557 --replay-endpoint tcp://127.0.0.1:5558 --out rec
      sage-kv-stats listen tcp://10.0.0.5:5557 --out rec --duration 600 --metrics-port 9401
    """
    from sagellm_kv_cache.errors import KVConfigError
    from sagellm_kv_cache.observability.shadow import EventRecorder
    from sagellm_kv_cache.observability.vllm_subscriber import VLLMEventSubscriber
    from sagellm_kv_cache.observability.vllm_zmq import check_endpoint

    try:
        # endpoints first: a mistake there must not leave an empty --out behind
        check_endpoint(endpoint, "endpoint")
        if replay_endpoint is not None:
            check_endpoint(replay_endpoint, "--replay-endpoint")
        recorder = EventRecorder(out_dir, flush_rows=flush_rows)
        sub = VLLMEventSubscriber(
            endpoint, replay_endpoint, topic=topic, recorder=recorder, start_seq=start_seq
        )
    except KVConfigError as exc:
        raise click.BadParameter(exc.message) from None
    server = None
    try:
        if metrics_port is not None:
            from sagellm_kv_cache.observability.listen_metrics import SubscriberCollector
            from sagellm_kv_cache.observability.server import start_metrics_server

            collector = SubscriberCollector([sub])
            server = start_metrics_server(metrics_port, metrics_addr, registry=collector)
            click.echo(f"metrics at {server.url}", err=True)
        tick = None if quiet else (lambda s: click.echo(status_line(s, capacity_blocks), err=True))
        started = time.time()
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a listen normally
            sub.run(duration_s=duration_s, max_batches=max_batches, on_tick=tick, tick_s=1.0)
    finally:
        if server is not None:
            server.shutdown()
        sub.close()  # flushes the recorder
    summary = {
        "config": {
            "endpoint": endpoint,
            "replay_endpoint": replay_endpoint,
            "topic": topic,
            "duration_s": duration_s,
            "max_batches": max_batches,
            "start_seq": start_seq,
            "capacity_blocks": capacity_blocks,
            "flush_rows": flush_rows,
        },
        "started_at": started,
        "stats": sub.stats(),
        "shadow_blocks": {
            f"{ep}|{rank}|{medium}": n for (ep, rank, medium), n in sub.shadow.sizes().items()
        },
        "gaps_lost": sub.gaps,
        "parts": [p.name for p in recorder.parts],
    }
    (out_dir / "listen_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(status_line(sub, capacity_blocks))


COMMANDS: list[click.Command] = [listen]
