"""Capacity x policy x trace sweeps of sequential replays, run in parallel.

One *job* is one ``replay_sequential(table, capacity_blocks, policy)`` (or one
offline-optimal replay for the OPT bound, or one infinite-capacity replay).
``sweep`` builds every job, runs them on an executor and returns one polars
row per job in a fixed order that never depends on completion order::

    for trace in traces:                     # in the order given
        for policy in policies:              # in the order given
            for capacity in capacities:      #   "   "
                row  kind="policy"
        for capacity in capacities:
            row  policy="opt"       kind="bound"   (when sim.opt is available)
        for capacity in capacities:
            row  policy="infinite"  kind="bound"

The infinite bound is one replay per trace (a pool that never evicts); its
figures are repeated on each capacity's row so every (trace, policy) series
has the same capacities. Its ``seconds`` is that one replay's time on each row.

``seconds`` is a job's wall time where it ran, ``cpu_seconds`` the CPU time
of the process that ran it over the same span (on a busy machine the gap is
time spent waiting for a core).

Executors:

``"serial"``
    every job in this process, one after the other.
``"process"``
    a ``concurrent.futures.ProcessPoolExecutor`` over local cores (``workers``,
    default ``os.cpu_count()``, never more than the number of jobs). The pool
    starts before the traces are read, so workers boot meanwhile. Each trace
    table is written once to an Arrow IPC file in a temporary directory; a
    worker reads it the first time one of its jobs needs it, so a job ships
    only ``(file, trace, kind, policy, capacity)`` and returns a small summary
    dict. Workers are forked from multiprocessing's ``forkserver`` with
    ``polars`` and ``sim.replay`` preloaded (``spawn`` where there is no
    forkserver): never forked from this process, whose polars thread pool
    would not survive ``fork``. The first sweep of a process starts the
    forkserver; later sweeps fork ready workers from it. As with any
    spawn/forkserver pool, a *script* that sweeps on processes needs the
    ``if __name__ == "__main__":`` guard (workers import the main module).
``"ray"``
    Ray remote tasks. Uses the running Ray instance if ``ray.is_initialized()``;
    else connects to ``ray_address`` or starts a local instance with
    ``num_cpus=workers`` (and shuts down only what it started). Each table is
    ``ray.put`` once and passed to the tasks by reference.

A job that raises surfaces as :class:`SweepJobError` naming the job (trace,
policy, capacity), with the worker's exception chained as ``__cause__``; the
jobs not yet started are cancelled.

Example::

    from sim.sweep import sweep
    df = sweep(["traces/data/mooncake_synthetic_trace.jsonl"], [1000, 10000], ["lru"])
"""

from __future__ import annotations

import operator
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError
from sim.errors import KVSweepJobError
from sim.sweep_grid import GRID_FIELDS
from sim.sweep_grid import grid_settings as _grid_settings

__all__ = [
    "BOUNDS",
    "EXECUTORS",
    "GRID_FIELDS",
    "SWEEP_COLUMNS",
    "SweepJob",
    "SweepJobError",
    "sweep",
]

EXECUTORS = ("process", "serial", "ray")
#: bound names, in the order their rows follow a trace's policy rows
BOUNDS = ("opt", "infinite")
#: the result's columns, in order
SWEEP_COLUMNS = (
    "trace",
    "policy",
    "kind",
    "capacity_blocks",
    "token_hit_ratio",
    "block_hit_ratio",
    "request_hit_ratio",
    "hit_blocks",
    "full_blocks",
    "prompt_tokens",
    "num_requests",
    "block_size",
    "evictions",
    "seconds",
    "cpu_seconds",
    "mode",
    "setting",
    *(f"{m}_{q}_s" for m in ("ttft", "tpot", "e2e", "queue") for q in ("p50", "p90", "p99")),
    "throughput_rps",
    "load_imbalance",
)
_TIMING = tuple(
    c for c in SWEEP_COLUMNS if c.endswith("_s") and c[:4] in ("ttft", "tpot", "e2e_", "queu")
)


#: one sweep job failed (``details["job"]`` names it); defined with the other errors
SweepJobError = KVSweepJobError


@dataclass(frozen=True, slots=True)
class SweepJob:
    """One replay: ``kind`` is ``"policy"``, ``"opt"`` or ``"infinite"``."""

    trace_index: int
    trace: str
    kind: str
    policy: str
    capacity_blocks: int | None
    mode: str = "sequential"
    #: other configuration fields of this replay, ``((name, value), ...)`` (``GRID_FIELDS``)
    settings: tuple = ()

    def describe(self) -> str:
        n = self.capacity_blocks
        cap = "infinite" if n is None else f"{n} blocks"
        what = {"policy": f"policy {self.policy!r}", "opt": "OPT bound", "infinite": "infinite"}
        more = "".join(f", {k}={v}" for k, v in self.settings)
        mode = f", {self.mode}" if self.kind == "policy" and self.mode != "sequential" else ""
        return f"trace {self.trace!r}, {what[self.kind]}, capacity {cap}{mode}{more}"


# ---------------------------------------------------------------- one job


def _run_job(table, job: SweepJob) -> dict[str, Any]:
    """Run one job on ``table``; a summary dict (no per-request records)."""
    from sim.replay import replay_sequential
    from sim.simulate import simulate

    t0, c0 = time.perf_counter(), time.process_time()
    if job.kind == "policy" and (job.mode != "sequential" or job.settings):
        r = simulate(table, job.capacity_blocks, job.policy, mode=job.mode, **dict(job.settings))
    elif job.kind == "policy":
        r = replay_sequential(table, job.capacity_blocks, job.policy)
    elif job.kind == "infinite":
        r = replay_sequential(table, None, "lru")
    elif job.kind == "opt":
        from sim.opt import replay_opt

        r = replay_opt(table, job.capacity_blocks)
    else:  # pragma: no cover - jobs are built here
        raise KVInvalidInputError(f"unknown job kind {job.kind!r}")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    s = r.summary()
    clocked = s.get("clock") == "simulated"  # timing only where the mode has a clock
    nan = float("nan")
    timing = {c: float(s[c]) if clocked and c in s else nan for c in _TIMING}
    timing["throughput_rps"] = float(s.get("throughput_rps", nan)) if clocked else nan
    timing["load_imbalance"] = float(s.get("load_imbalance", nan))  # fleet rows (max/mean)
    return {
        "token_hit_ratio": float(r.token_hit_ratio),
        "block_hit_ratio": float(r.block_hit_ratio),
        "request_hit_ratio": float(r.request_hit_ratio),
        "hit_blocks": int(r.hit_blocks),
        "full_blocks": int(r.full_blocks),
        "prompt_tokens": int(r.prompt_tokens),
        "num_requests": int(r.num_requests),
        "block_size": int(r.block_size),
        "evictions": int(r.evictions),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        **timing,
    }


# ------------------------------------------------------- process executor

#: worker side: IPC file path -> table, read (memory-mapped) once per worker
_WORKER_TABLES: dict[str, Any] = {}


def _worker_warm() -> int:
    """Import what a job needs, so the pool's start overlaps the parent reading traces."""
    import polars  # noqa: F401

    import sim.replay  # noqa: F401

    return os.getpid()


def _worker_job(ipc_path: str, job: SweepJob) -> dict[str, Any]:
    table = _WORKER_TABLES.get(ipc_path)
    if table is None:
        import polars as pl

        table = _WORKER_TABLES[ipc_path] = pl.read_ipc(ipc_path)
    return _run_job(table, job)


def _failed(job: SweepJob, err: BaseException) -> SweepJobError:
    return SweepJobError(
        f"sweep job failed ({job.describe()}): {type(err).__name__}: {err}",
        job=job.describe(),
        trace=job.trace,
        policy=job.policy,
        capacity_blocks=job.capacity_blocks,
    )


def _run_serial(tables, jobs, bar) -> list[dict]:
    out = []
    for job in jobs:
        try:
            out.append(_run_job(tables[job.trace_index], job))
        except Exception as err:
            raise _failed(job, err) from err
        bar.update(1)
    return out


def _start_pool(workers: int):
    """A process pool with every worker already starting (warm-up tasks submitted)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        # only takes effect when this call starts the (process-wide) forkserver
        ctx.set_forkserver_preload(["polars", "sim.replay", "sim.sweep"])
    else:  # pragma: no cover - Windows
        ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    for _ in range(workers):
        pool.submit(_worker_warm)
    return pool


def _run_process(pool, tables, jobs, bar) -> list[dict]:
    import tempfile
    from concurrent.futures import FIRST_EXCEPTION, wait

    results: list[dict | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="kv-sweep-") as tmp:
        # each table crosses to the workers once, as an Arrow IPC file they memory-map
        paths = []
        for i, table in enumerate(tables):
            path = os.path.join(tmp, f"trace{i}.arrow")
            table.write_ipc(path)
            paths.append(path)
        futures = {
            pool.submit(_worker_job, paths[job.trace_index], job): i for i, job in enumerate(jobs)
        }
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    i = futures[fut]
                    err = fut.exception()
                    if err is not None:
                        raise _failed(jobs[i], err) from err
                    results[i] = fut.result()
                    bar.update(1)
        finally:
            for fut in pending:
                fut.cancel()
            wait(pending)  # running jobs finish before their files go
    return results  # type: ignore[return-value]


# ----------------------------------------------------------- ray executor


def _ray_job_body(table, job: SweepJob) -> dict[str, Any]:
    return _run_job(table, job)


def _run_ray(tables, jobs, bar, workers: int, address: str | None) -> list[dict]:
    try:
        import ray
    except ImportError as err:
        raise KVConfigError(
            "executor='ray' needs ray (pip install 'sagellm-kv-cache[ray]')"
        ) from err

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # Workers must import sim/ from this checkout even when it is not installed.
            # The local instance's processes inherit this environment, which is cheaper
            # than a runtime_env (that starts a separate worker pool).
            root = str(Path(__file__).resolve().parent.parent)
            old_path = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, old_path]))
            try:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            finally:
                if old_path is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = old_path
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_job_body)
        refs = [ray.put(t) for t in tables]
        futures = [remote.remote(refs[job.trace_index], job) for job in jobs]
        index = {f: i for i, f in enumerate(futures)}
        results: list[dict | None] = [None] * len(jobs)
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                try:
                    results[i] = ray.get(ref)
                except Exception as err:
                    for other in pending:
                        ray.cancel(other)
                    cause = getattr(err, "cause", None) or err
                    raise _failed(jobs[i], cause) from err
                bar.update(1)
        return results  # type: ignore[return-value]
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------ sweep


def _trace_items(traces) -> list[tuple[str, Path | None, Any]]:
    """``(name, path or None, table or None)`` per trace, names unique; nothing read yet."""
    if isinstance(traces, str | os.PathLike) or (
        isinstance(traces, tuple)
        and len(traces) == 2
        and isinstance(traces[0], str)
        and not isinstance(traces[1], str | os.PathLike)
    ):
        traces = [traces]
    items: list[tuple[str, Path | None, Any]] = []
    names: set[str] = set()
    for item in traces:
        if isinstance(item, str | os.PathLike):
            path = Path(item)
            if not path.is_file():
                raise KVInvalidInputError(f"trace file not found: {path}", path=str(path))
            name, table = path.name, None
        elif isinstance(item, tuple) and len(item) == 2:
            name, path, table = str(item[0]), None, item[1]
            if not hasattr(table, "columns") or "block_hashes" not in table.columns:
                raise KVInvalidInputError(
                    f"trace {name!r}: expected a canonical trace table (polars DataFrame "
                    "with block_hashes, input_length, ...)"
                )
        else:
            raise KVInvalidInputError(
                f"a trace is a path or a (name, table) pair, got {type(item).__name__}"
            )
        if name in names:  # keep names unique: they label rows and panels
            k = 2
            while f"{name}#{k}" in names:
                k += 1
            name = f"{name}#{k}"
        names.add(name)
        items.append((name, path, table))
    if not items:
        raise KVInvalidInputError("sweep needs at least one trace")
    return items


def _unique(values, scalar: type, check, what: str) -> list:
    """``values`` (or one ``scalar``) each passed through ``check``, duplicates dropped."""
    if isinstance(values, scalar):
        values = [values]
    out: list = []
    for v in values:
        v = check(v)
        if v not in out:
            out.append(v)
    if not out:
        raise KVConfigError(f"sweep needs at least one {what}")
    return out


def _capacity(c) -> int:
    try:
        if isinstance(c, bool):
            raise TypeError
        c = operator.index(c)  # ints and numpy integers, not floats or strings
    except TypeError:
        raise KVConfigError(f"capacities must be positive block counts, got {c!r}") from None
    if c < 1:
        raise KVConfigError(f"capacities must be positive block counts, got {c!r}")
    return c


def _policy(p) -> str:
    from sagellm_kv_cache.eviction.registry import make_policy

    if not isinstance(p, str):
        raise KVConfigError(f"policies are names, got {p!r}")
    make_policy(p)  # KVConfigError naming the choices when unknown
    if p in BOUNDS:
        raise KVConfigError(f"{p!r} is a bound, not a policy; bounds are added with bounds=")
    return p


def _normalise_capacities(capacities) -> list[int]:
    return _unique(capacities, int, _capacity, "capacity")


def _normalise_policies(policies) -> list[str]:
    return _unique(policies, str, _policy, "policy")


def _normalise_bounds(bounds) -> list[str]:
    if bounds is True:
        return list(BOUNDS)
    if bounds is False or bounds is None:
        return []
    if isinstance(bounds, str):
        bounds = [bounds]
    wanted = list(bounds)
    for b in wanted:
        if b not in BOUNDS:
            raise KVConfigError(f"unknown bound {b!r}; choose from {list(BOUNDS)}")
    return [b for b in BOUNDS if b in wanted]


def sweep(
    traces: str | os.PathLike | tuple[str, Any] | Iterable[str | os.PathLike | tuple[str, Any]],
    capacities: int | Sequence[int],
    policies: str | Sequence[str] = ("lru",),
    *,
    executor: str = "process",
    workers: int | None = None,
    bounds: bool | str | Sequence[str] = True,
    progress: bool = True,
    format: str = "auto",
    ray_address: str | None = None,
    mode: str = "sequential",
    grid: dict[str, Sequence[Any]] | None = None,
):
    """Replays of every trace x policy x capacity (x setting), plus bound rows.

    Args:
        traces: trace file paths (read with ``traces.read_trace(path, format)``)
            and/or ``(name, table)`` pairs of canonical tables. Paths are named
            by their file name; repeated names get ``#2``, ``#3``...
        capacities: cache sizes in blocks (positive ints; duplicates dropped).
        policies: eviction policy names from the registry.
        executor: ``"process"`` (default), ``"serial"`` or ``"ray"``.
        workers: processes / Ray CPUs (default ``os.cpu_count()``, capped at the
            number of jobs for processes).
        bounds: ``True`` for every bound available (``"opt"`` needs
            ``sim.opt``; it is skipped with a warning when absent, ``"infinite"``
            always runs), ``False`` for none, or a list of bound names.
        progress: a tqdm bar over jobs.
        format: trace format for paths.
        ray_address: Ray cluster address (executor ``"ray"``; default: a local instance).
        mode: ``"sequential"`` or ``"concurrent"`` (clocked: the rows get TTFT, TPOT,
            E2E and queueing p50/p90/p99 and throughput; NaN where there is no clock).
        grid: more configuration fields to vary, each a list of values
            (:data:`GRID_FIELDS`: ``max_num_seqs``, ``cost``, ``tiers``, ``model_shape``,
            ``instances``, ``router``, ``engine``: ``"request"`` or ``"iteration"``, the
            latter with ``cost`` any ``sim.cost`` spec);
            every combination runs for every policy and capacity, in the order given,
            and is named in the ``setting`` column (``"max_num_seqs=8"``). Bounds
            are sequential hit-ratio bounds and run once per capacity.

    Returns:
        polars DataFrame with :data:`SWEEP_COLUMNS`, rows in the order of the
        module docstring (settings vary fastest inside a policy's capacity);
        ``kind`` is ``"policy"`` or ``"bound"``.

    Raises:
        KVConfigError: unknown executor, policy or bound, bad capacities or workers.
        KVInvalidInputError: a missing trace file or a malformed trace item.
        KVTraceFormatError: a malformed trace file.
        SweepJobError: a replay failed; names the job.
    """
    import polars as pl
    from tqdm import tqdm

    if executor not in EXECUTORS:
        raise KVConfigError(f"unknown executor {executor!r}; choose from {list(EXECUTORS)}")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise KVConfigError(f"workers must be a positive integer, got {workers!r}")
    caps = _normalise_capacities(capacities)
    pols = _normalise_policies(policies)
    wanted_bounds = _normalise_bounds(bounds)
    items = _trace_items(traces)
    from .simulate import MODES

    if mode not in MODES:
        raise KVConfigError(f"mode must be one of {MODES}, got {mode!r}")
    settings = _grid_settings(grid)

    jobs: list[SweepJob] = []
    for ti, (name, _, _) in enumerate(items):
        jobs += [
            SweepJob(ti, name, "policy", p, c, mode, st)
            for p in pols
            for c in caps
            for st in settings
        ]
        if "opt" in wanted_bounds:
            jobs += [SweepJob(ti, name, "opt", "opt", c) for c in caps]
        if "infinite" in wanted_bounds:
            jobs.append(SweepJob(ti, name, "infinite", "infinite", None))

    n_workers = workers or os.cpu_count() or 1
    # the pool starts first so its workers boot while this process reads the traces
    pool = _start_pool(min(n_workers, len(jobs))) if executor == "process" else None
    try:
        from traces import read_trace

        tables = [t if t is not None else read_trace(p, format) for _, p, t in items]
        with tqdm(total=len(jobs), desc="sweep", unit="replay", disable=not progress) as bar:
            if pool is not None:
                results = _run_process(pool, tables, jobs, bar)
            elif executor == "serial":
                results = _run_serial(tables, jobs, bar)
            else:
                results = _run_ray(tables, jobs, bar, n_workers, ray_address)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    rows: list[dict[str, Any]] = []
    for job, res in zip(jobs, results, strict=True):
        res = {
            **res,
            "mode": job.mode if job.kind == "policy" else "sequential",
            "setting": ",".join(f"{k}={v}" for k, v in job.settings),
        }
        base = {"trace": job.trace, "policy": job.policy}
        if job.kind == "infinite":
            rows += [{**base, "kind": "bound", "capacity_blocks": c, **res} for c in caps]
        else:
            kind = "policy" if job.kind == "policy" else "bound"
            rows.append({**base, "kind": kind, "capacity_blocks": job.capacity_blocks, **res})
    schema = {
        "trace": pl.Utf8,
        "policy": pl.Utf8,
        "kind": pl.Utf8,
        "capacity_blocks": pl.Int64,
        "token_hit_ratio": pl.Float64,
        "block_hit_ratio": pl.Float64,
        "request_hit_ratio": pl.Float64,
        "hit_blocks": pl.Int64,
        "full_blocks": pl.Int64,
        "prompt_tokens": pl.Int64,
        "num_requests": pl.Int64,
        "block_size": pl.Int64,
        "evictions": pl.Int64,
        "seconds": pl.Float64,
        "cpu_seconds": pl.Float64,
        "mode": pl.Utf8,
        "setting": pl.Utf8,
        **{c: pl.Float64 for c in _TIMING},
        "throughput_rps": pl.Float64,
        "load_imbalance": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)
