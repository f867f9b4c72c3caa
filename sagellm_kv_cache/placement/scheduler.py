"""``LoadAwareScheduler``: which device (serving instance) a request goes to.

The seed's strategies (ROUND_ROBIN, LOWEST_KV, SHORTEST_QUEUE, BEST_FIT) read
load from a ``LoadMetricsCollector``; the prefix-aware ones also ask each
device's pool how much of the request it already holds (a peek). The rules:

=================  ==========================================================
round_robin        candidates in turn
random             uniform, from a seeded generator
lowest_kv          lowest KV utilization (blocks in use / capacity)
shortest_queue     fewest requests (running + waiting)
best_fit           among devices with room for ``kv_tokens_required``, lowest KV
                   utilization then fewest requests; none has room: lowest_kv
longest_prefix     most leading blocks cached; ties: fewest requests
kv_cost            NVIDIA Dynamo's KV router: cost = overlap_score_weight x
                   prefill blocks (the request's blocks the device lacks) +
                   decode blocks (the device's blocks in use); temperature 0:
                   lowest cost, else softmax sampling over the costs (scaled
                   to [0, 1]) with that temperature
cache_aware        SGLang's cache-aware router: when the load is imbalanced
                   (max - min > balance_abs_threshold and max >
                   balance_rel_threshold x min, load = requests) the shortest
                   queue; else the longest prefix match when its match ratio
                   (matched / request blocks) > cache_threshold, else the lowest
                   KV load (SGLang: the smallest tree)
consistent_hash    a hash ring (virtual nodes) on the session id or the
                   prefix root (the request's first block hash)
=================  ==========================================================

Sources of the routers' rules (facts, restated; no code taken): the Dynamo
KV-router documentation (``overlap_score_weight``, ``router_temperature``;
cost = weight x prefill blocks + decode blocks, softmax over the workers'
logits) and the SGLang router documentation (cache-aware load balancing with
``cache_threshold`` 0.3, ``balance_abs_threshold`` 64, ``balance_rel_threshold``
1.5). Where a rule is open (ties, an unregistered pool), ties go to the device
with the fewest placements so far, then the first in candidate order, so every
choice is deterministic for a given seed.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import math
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from ..errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError
from .metrics import DeviceLoadMetrics, LoadMetricsCollector
from .placer import Figures, by_overlap, in_turn

__all__ = ["PREFIX_STRATEGIES", "LoadAwareScheduler", "PlacementStrategy"]


class PlacementStrategy(StrEnum):
    """How ``LoadAwareScheduler`` picks a device (see the module table)."""

    ROUND_ROBIN = "round_robin"
    LOWEST_KV = "lowest_kv"
    SHORTEST_QUEUE = "shortest_queue"
    BEST_FIT = "best_fit"
    RANDOM = "random"
    LONGEST_PREFIX = "longest_prefix"
    KV_COST = "kv_cost"
    CACHE_AWARE = "cache_aware"
    CONSISTENT_HASH = "consistent_hash"


S = PlacementStrategy
#: strategies that ask each device's pool for the request's cached prefix
PREFIX_STRATEGIES = frozenset({S.LONGEST_PREFIX, S.KV_COST, S.CACHE_AWARE})
_METRIC_STRATEGIES = frozenset({S.LOWEST_KV, S.SHORTEST_QUEUE, S.BEST_FIT}) | PREFIX_STRATEGIES
_KV_STRATEGIES = frozenset({S.LOWEST_KV, S.BEST_FIT, S.KV_COST, S.CACHE_AWARE})


def _stable_hash(key: Any) -> int:
    """A process-independent 64-bit hash (Python's ``hash`` of str is salted per process)."""
    data = key if isinstance(key, bytes) else repr(key).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _number(value: Any, name: str, *, lo: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise KVConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not (v >= lo and math.isfinite(v)):
        raise KVConfigError(f"{name} must be a finite number >= {lo}, got {value!r}")
    return v


class LoadAwareScheduler:
    """Places requests on devices by a ``PlacementStrategy`` over a ``LoadMetricsCollector``.

    Args:
        collector: the devices' metrics (and pools, for prefix-aware strategies).
        strategy: a ``PlacementStrategy`` or its value (``"kv_cost"``).
        enable_load_awareness: False: round-robin whatever the strategy (the seed's switch).
        seed: the generator of ``random`` and of ``kv_cost`` sampling.
        overlap_score_weight, temperature: ``kv_cost`` (Dynamo) parameters.
        cache_threshold, balance_abs_threshold, balance_rel_threshold: ``cache_aware``
            (SGLang) parameters.
        hash_key: ``consistent_hash`` key: ``"session"`` (falls back to the prefix
            root when a request has no session) or ``"prefix"``.
        virtual_nodes: ring points per device for ``consistent_hash``.
        auto_refresh: read attached pools' ``get_stats()`` before each KV-reading
            choice (a caller that updates the metrics itself passes False).

    Example:
        >>> from sagellm_kv_cache.placement import LoadMetricsCollector
        >>> c = LoadMetricsCollector()
        >>> c.register_device("cuda:0", kv_tokens_capacity=4096)
        >>> c.register_device("cuda:1", kv_tokens_capacity=4096)
        >>> c.update_kv_usage("cuda:0", 2048)
        >>> LoadAwareScheduler(c, PlacementStrategy.LOWEST_KV).select_device(["cuda:0", "cuda:1"])
        'cuda:1'
    """

    def __init__(
        self,
        collector: LoadMetricsCollector,
        strategy: PlacementStrategy | str = PlacementStrategy.LOWEST_KV,
        enable_load_awareness: bool = True,
        *,
        seed: int = 0,
        overlap_score_weight: float = 1.0,
        temperature: float = 0.0,
        cache_threshold: float = 0.3,
        balance_abs_threshold: float = 64,
        balance_rel_threshold: float = 1.5,
        hash_key: str = "session",
        virtual_nodes: int = 64,
        auto_refresh: bool = True,
    ) -> None:
        if not isinstance(collector, LoadMetricsCollector):
            raise KVInvalidTypeError(
                f"collector must be a LoadMetricsCollector, got {type(collector).__name__}"
            )
        try:
            self.strategy = PlacementStrategy(strategy)
        except ValueError:
            names = [s.value for s in PlacementStrategy]
            raise KVConfigError(
                f"unknown placement strategy {strategy!r}; one of {names}"
            ) from None
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise KVConfigError(f"seed must be an integer, got {seed!r}")
        if hash_key not in ("session", "prefix"):
            raise KVConfigError(f"hash_key must be 'session' or 'prefix', got {hash_key!r}")
        if (
            isinstance(virtual_nodes, bool)
            or not isinstance(virtual_nodes, int)
            or virtual_nodes < 1
        ):
            raise KVConfigError(f"virtual_nodes must be an integer >= 1, got {virtual_nodes!r}")
        self.overlap_score_weight = _number(overlap_score_weight, "overlap_score_weight")
        self.temperature = _number(temperature, "temperature")
        self.cache_threshold = _number(cache_threshold, "cache_threshold")
        if self.cache_threshold > 1:
            raise KVConfigError(f"cache_threshold must be in [0, 1], got {cache_threshold!r}")
        self.balance_abs_threshold = _number(balance_abs_threshold, "balance_abs_threshold")
        self.balance_rel_threshold = _number(balance_rel_threshold, "balance_rel_threshold")
        self.collector = collector
        self.enable_load_awareness = bool(enable_load_awareness)
        self.seed = seed
        self.hash_key = hash_key
        self.virtual_nodes = virtual_nodes
        self.auto_refresh = bool(auto_refresh)
        self._rng = random.Random(seed)
        self._round_robin_index = 0
        self._placement_count = 0
        self._placement_decisions: dict[Hashable, int] = {}
        #: bumped by ``reset_stats`` (a placer's copy of the counts is stale then)
        self._resets = 0
        self._rings: dict[tuple, tuple[list[int], list[Hashable]]] = {}
        #: per candidate, the leading cached blocks found by the last prefix-aware choice
        self.last_matches: list[int] | None = None
        s = self.strategy if self.enable_load_awareness else S.ROUND_ROBIN
        self._effective = s
        #: what the effective strategy reads: the pools' prefixes, KV figures, any metric
        self.needs_prefix = s in PREFIX_STRATEGIES
        self.needs_kv = s in _KV_STRATEGIES
        self.needs_metrics = s in _METRIC_STRATEGIES
        #: the rule of the effective strategy: (candidates, metrics, need, hashes,
        #: session, request) -> device
        self._rule = {
            S.ROUND_ROBIN: self._round_robin,
            S.RANDOM: self._random,
            S.CONSISTENT_HASH: self._consistent,
            S.LOWEST_KV: self._lowest_kv,
            S.SHORTEST_QUEUE: self._shortest_queue,
            S.BEST_FIT: self._best_fit,
            S.LONGEST_PREFIX: self._longest_prefix,
            S.KV_COST: self._kv_cost,
            S.CACHE_AWARE: self._cache_aware,
        }[s]

    # -- public ------------------------------------------------------------------
    def is_enabled(self) -> bool:
        """Whether load-aware placement is on (off: round-robin)."""
        return self.enable_load_awareness

    def select_device(
        self,
        candidate_devices: Sequence[Hashable],
        kv_tokens_required: int = 0,
        request_id: str | None = None,
        *,
        block_hashes: Sequence[Hashable] | None = None,
        session_id: Hashable | None = None,
    ) -> Hashable:
        """Pick one of ``candidate_devices`` for a request.

        Args:
            candidate_devices: device ids (registered with the collector for
                metric-reading strategies).
            kv_tokens_required: the request's KV tokens (``best_fit``; ``kv_cost``
                counts its blocks from ``block_hashes``).
            request_id: for logs (unused by the rules).
            block_hashes: the request's chained block hashes (prefix-aware
                strategies, ``consistent_hash`` on the prefix root).
            session_id: the conversation (``consistent_hash`` on the session).

        Returns:
            the chosen device id. ``last_matches`` then holds each candidate's
            cached leading blocks when the strategy asked the pools.

        Raises:
            KVInvalidInputError: no candidates, or one not registered (metric strategies).
            KVInvalidTypeError: candidates or block hashes of the wrong type.
        """
        if not isinstance(candidate_devices, list | tuple):
            raise KVInvalidTypeError(
                f"candidate_devices must be a list, got {type(candidate_devices).__name__}"
            )
        if not candidate_devices:
            raise KVInvalidInputError("select_device needs at least one candidate device")
        if isinstance(kv_tokens_required, bool) or not hasattr(kv_tokens_required, "__index__"):
            raise KVInvalidTypeError(
                f"kv_tokens_required must be an integer, got {type(kv_tokens_required).__name__}"
            )
        if kv_tokens_required < 0:
            raise KVInvalidInputError(f"kv_tokens_required must be >= 0, got {kv_tokens_required}")
        if block_hashes is not None and not isinstance(block_hashes, list | tuple):
            raise KVInvalidTypeError(
                f"block_hashes must be a list or tuple, got {type(block_hashes).__name__}"
            )
        return self.place(
            candidate_devices, int(kv_tokens_required), block_hashes, session_id, request_id
        )

    def place(
        self,
        candidate_devices: Sequence[Hashable],
        kv_tokens_required: int = 0,
        block_hashes: Sequence[Hashable] | None = None,
        session_id: Hashable | None = None,
        request_id: str | None = None,
    ) -> Hashable:
        """``select_device`` without its type checks, for a caller whose arguments are
        known good (a simulator's inner loop): a non-empty list of devices, an int >= 0,
        a list of hashes or None. An unregistered device is still a
        ``KVInvalidInputError`` for the metric-reading strategies."""
        ms: list[DeviceLoadMetrics] = []
        if self.needs_metrics:
            ms = self.collector.metrics_of(candidate_devices)  # checks they are registered
            if self.auto_refresh and self.needs_kv:
                self.collector.refresh(candidate_devices)
        self.last_matches = None
        device = self._rule(
            candidate_devices, ms, kv_tokens_required, block_hashes, session_id, request_id
        )
        self._placement_count += 1
        pd = self._placement_decisions
        pd[device] = pd.get(device, 0) + 1
        return device

    def placer(
        self, candidate_devices: Sequence[Hashable], *, fixed_metrics: bool = False
    ) -> Callable[..., Hashable]:
        """``place`` bound to one list of devices, for a caller that places every
        request on the same devices (a simulator's router).

        Returns ``fn(kv_tokens_required, block_hashes, session_id=None,
        request_id=None) -> device``: the same choices and the same state changes
        (counters, generator, ``last_matches``) as ``place(candidate_devices, ...)``.
        A prefix-aware strategy looks up the devices' metrics and their peek once
        (``LoadMetricsCollector.metrics_of`` / ``matcher_of``) instead of per request;
        once the collector changes (its ``version``: a device registered, a pool
        attached) every call goes through ``place``. ``fixed_metrics``: the caller
        changes none of the devices' metrics while it uses the placer (a replay that
        keeps them as registered), so a prefix-aware strategy reads them once.

        Raises:
            KVInvalidInputError: no devices, or one not registered (metric strategies).
        """
        devices = list(candidate_devices)  # the caller's list may change; this one will not
        if not devices:
            raise KVInvalidInputError("placer needs at least one candidate device")
        counts = self._placement_decisions
        n = len(devices)
        if self._effective is S.ROUND_ROBIN:  # reads no metric: its turn, counted as ``place``
            return in_turn(self, devices)
        pick = {
            S.LONGEST_PREFIX: self._pick_longest,
            S.KV_COST: self._pick_kv_cost,
            S.CACHE_AWARE: self._pick_cache_aware,
        }.get(self._effective)
        if pick is None or (self.auto_refresh and self.needs_kv):
            return functools.partial(self.place, devices)
        collector = self.collector
        version = collector.version
        ms = collector.metrics_of(devices)  # checks they are registered
        match = collector.matcher_of(devices)
        place = self.place
        zeros = [0] * n
        fixed = Figures.of(ms) if fixed_metrics else None
        choose: Callable[[list[int], int], Hashable] | None = None
        if fixed is not None:
            eff = self._effective
            if eff is S.KV_COST:
                alike = fixed.decode_alike
            else:
                alike = fixed.loads_alike and (eff is S.LONGEST_PREFIX or fixed.used_alike)
            if alike:  # the metrics tell no device apart: the overlap decides alone
                choose = by_overlap(self, eff.value, pick, devices, ms, fixed)
        if choose is None:

            def choose(matches: list[int], num_blocks: int) -> Hashable:
                device = pick(devices, ms, matches, num_blocks, fixed)
                self._placement_count += 1
                counts[device] = counts.get(device, 0) + 1
                return device

        def place_on_devices(
            need: int,
            hashes: Sequence[Hashable] | None,
            session_id: Hashable | None = None,
            request_id: str | None = None,
        ) -> Hashable:
            if collector.version != version:  # looked up before a change: the general path
                return place(devices, need, hashes, session_id, request_id)
            if hashes:
                matches = match(hashes)
                self.last_matches = matches
                return choose(matches, len(hashes))
            self.last_matches = matches = zeros[:]
            return choose(matches, 0)

        return place_on_devices

    def select_device_for_request(
        self, request: Any, candidate_devices: Sequence[Hashable] | None = None
    ) -> Hashable:
        """Pick a device for a request object or mapping.

        Reads ``request_id``, ``kv_tokens_required`` (else ``num_tokens``),
        ``block_hashes`` (else, with ``prompt_tokens`` and an attached pool,
        that pool's hashes of them), ``session_id`` and ``device_affinity``
        (when set, the only candidate). ``candidate_devices`` None: every
        registered device.
        """

        def get(name: str) -> Any:
            if isinstance(request, Mapping):
                return request.get(name)
            return getattr(request, name, None)

        affinity = get("device_affinity")
        if affinity is not None:
            candidates: Sequence[Hashable] = [affinity]
        elif candidate_devices is None:
            candidates = self.collector.list_devices()
        else:
            candidates = candidate_devices
        need = get("kv_tokens_required")
        if need is None:
            need = get("num_tokens") or 0
        hashes = get("block_hashes")
        tokens = get("prompt_tokens")
        if hashes is None and tokens is not None and self.needs_prefix:
            pools = (self.collector.get_pool(d) for d in candidates)
            pool = next((p for p in pools if p is not None), None)
            if pool is not None and hasattr(pool, "compute_block_hashes"):
                hashes = pool.compute_block_hashes(tokens)
        if hashes is not None and not isinstance(hashes, list | tuple):
            hashes = list(hashes)
        return self.select_device(
            list(candidates) if not isinstance(candidates, list | tuple) else candidates,
            need,
            get("request_id"),
            block_hashes=hashes,
            session_id=get("session_id"),
        )

    def get_placement_stats(self) -> dict[str, Any]:
        """``{"total_placements": n, "per_device": {device: n}}``."""
        return {
            "total_placements": self._placement_count,
            "per_device": dict(self._placement_decisions),
        }

    def reset_stats(self) -> None:
        """Zero the placement counters, the round-robin position and the generator."""
        self._placement_count = 0
        self._placement_decisions.clear()
        self._resets += 1
        self._round_robin_index = 0
        self._rng = random.Random(self.seed)

    def __repr__(self) -> str:
        return (
            f"LoadAwareScheduler(strategy={self.strategy.value}, "
            f"enabled={self.enable_load_awareness}, placements={self._placement_count})"
        )

    # -- rules ---------------------------------------------------------------------
    def _argmin(self, keys: list, candidates: Sequence[Hashable]) -> Hashable:
        """The candidate with the least key; ties: fewest placements, then first."""
        low = min(keys)
        ties = keys.count(low)
        j = keys.index(low)
        if ties == 1:  # the common case: one best, no tie to break
            return candidates[j]
        if ties == len(keys):  # all tied (idle devices): fewest placements, then first
            return self._fewest(candidates)
        get = self._placement_decisions.get
        best_j, best_n = j, get(candidates[j], 0)
        for _ in range(ties - 1):  # the other tied ones, in order: strictly fewer wins
            j = keys.index(low, j + 1)
            n = get(candidates[j], 0)
            if n < best_n:
                best_j, best_n = j, n
        return candidates[best_j]

    def _fewest(self, candidates: Sequence[Hashable]) -> Hashable:
        """The candidate placed on least so far, the first of those (``_argmin``, all tied)."""
        counts = list(map(self._placement_decisions.get, candidates, itertools.repeat(0)))
        return candidates[counts.index(min(counts))]

    def _round_robin(self, candidates, ms, need, hashes, session_id, request_id) -> Hashable:
        device = candidates[self._round_robin_index % len(candidates)]
        self._round_robin_index += 1
        return device

    def _random(self, candidates, ms, need, hashes, session_id, request_id) -> Hashable:
        return candidates[self._rng.randrange(len(candidates))]

    def _lowest_kv(self, candidates, ms, need, hashes, session_id, request_id) -> Hashable:
        return self._argmin([m.kv_utilization() for m in ms], candidates)

    def _shortest_queue(self, candidates, ms, need, hashes, session_id, request_id) -> Hashable:
        return self._argmin([m.total_requests() for m in ms], candidates)

    def _best_fit(self, candidates, ms, need, hashes, session_id, request_id) -> Hashable:
        keys = [
            (0 if m.available_kv_tokens() >= need else 1, m.kv_utilization(), m.total_requests())
            for m in ms
        ]
        return self._argmin(keys, candidates)

    def _matches(self, candidates: Sequence[Hashable], hashes: Any) -> list[int]:
        """Each candidate's cached leading blocks (a peek), kept in ``last_matches``."""
        if hashes:
            matches = self.collector.prefix_blocks_many(candidates, hashes)
        else:
            matches = [0] * len(candidates)
        self.last_matches = matches
        return matches

    def _longest_prefix(self, candidates, ms, need, hashes, session_id, request_id) -> Hashable:
        matches = self._matches(candidates, hashes)
        return self._pick_longest(candidates, ms, matches, len(hashes) if hashes else 0)

    def _kv_cost(self, candidates, ms, need, hashes, session_id, request_id) -> Hashable:
        matches = self._matches(candidates, hashes)
        return self._pick_kv_cost(candidates, ms, matches, len(hashes) if hashes else 0)

    def _cache_aware(self, candidates, ms, need, hashes, session_id, request_id) -> Hashable:
        matches = self._matches(candidates, hashes)
        return self._pick_cache_aware(candidates, ms, matches, len(hashes) if hashes else 0)

    # the prefix-aware choices from the candidates' matches (``place`` and ``placer``);
    # ``fixed``: the metrics' figures read once (``placer(..., fixed_metrics=True)``)
    def _pick_longest(
        self, candidates, ms, matches: list[int], num_blocks: int, fixed: Figures | None = None
    ) -> Hashable:
        best = max(matches)
        ties = matches.count(best)
        if ties == 1:  # one longest: the (-match, requests) minimum
            return candidates[matches.index(best)]
        if fixed is None:
            loads = [m.active_requests + m.queue_length for m in ms]
            alike = loads.count(loads[0]) == len(loads)
        else:
            loads, alike = fixed.loads, fixed.loads_alike
        if ties == len(matches):  # all match alike: the fewest requests decide
            return self._fewest(candidates) if alike else self._argmin(loads, candidates)
        return self._argmin([(-k, q) for k, q in zip(matches, loads)], candidates)

    def _pick_kv_cost(
        self, candidates, ms, matches: list[int], num_blocks: int, fixed: Figures | None = None
    ) -> Hashable:
        w = self.overlap_score_weight
        n = len(matches)
        k0 = matches[0]
        greedy = self.temperature == 0.0 or n == 1
        if matches.count(k0) == n:  # the same overlap everywhere: the same prefill term
            if fixed is None:
                decode = [m.kv_tokens_used // m.block_size for m in ms]
                alike = decode.count(decode[0]) == n
            else:
                decode, alike = fixed.decode, fixed.decode_alike
            if greedy and alike:  # every cost the same
                return self._fewest(candidates)
            prefill = w * (num_blocks - k0)
            costs = [prefill + d for d in decode]
        elif fixed is None:
            costs = [
                w * (num_blocks - k) + m.kv_tokens_used // m.block_size for k, m in zip(matches, ms)
            ]
        else:
            costs = [w * (num_blocks - k) + d for k, d in zip(matches, fixed.decode)]
        if greedy:
            return self._argmin(costs, candidates)
        lo, hi = min(costs), max(costs)
        span = (hi - lo) or 1.0
        weights = [math.exp(-(c - lo) / span / self.temperature) for c in costs]
        return candidates[self._rng.choices(range(len(candidates)), weights=weights)[0]]

    def _pick_cache_aware(
        self, candidates, ms, matches: list[int], num_blocks: int, fixed: Figures | None = None
    ) -> Hashable:
        loads = [m.active_requests + m.queue_length for m in ms] if fixed is None else fixed.loads
        hi, lo = max(loads), min(loads)
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            return self._argmin(loads, candidates)
        best = max(matches)
        if num_blocks and best / num_blocks > self.cache_threshold:
            ties = matches.count(best)
            if ties == 1:  # one longest: the (-match, load) minimum
                return candidates[matches.index(best)]
            if ties == len(matches) and hi == lo:  # all alike: fewest placements
                return self._fewest(candidates)
            return self._argmin([(-k, load) for k, load in zip(matches, loads)], candidates)
        if fixed is None:
            used = [m.kv_tokens_used for m in ms]
            alike = used.count(used[0]) == len(used)
        else:
            used, alike = fixed.used, fixed.used_alike
        if alike:  # every device as full: fewest placements
            return self._fewest(candidates)
        return self._argmin(used, candidates)

    def _consistent(self, candidates, ms, need, hashes, session_id, request_id) -> Hashable:
        key: Any = None
        if self.hash_key == "session" and session_id is not None:
            key = ("s", session_id)
        elif hashes:
            key = ("p", hashes[0])
        elif request_id is not None:
            key = ("r", request_id)
        if key is None:  # nothing to hash on: round-robin
            d = candidates[self._round_robin_index % len(candidates)]
            self._round_robin_index += 1
            return d
        ring = self._rings.get(tuple(candidates))
        if ring is None:
            points = sorted(
                (_stable_hash(("v", repr(d), v)), d)
                for d in candidates
                for v in range(self.virtual_nodes)
            )
            ring = ([p for p, _ in points], [d for _, d in points])
            if len(self._rings) > 64:
                self._rings.clear()
            self._rings[tuple(candidates)] = ring
        keys, devs = ring
        j = bisect.bisect(keys, _stable_hash(key))
        return devs[j % len(devs)]
