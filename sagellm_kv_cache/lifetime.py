"""Lifetime predictors (the seed's Task 2.5): how likely a handle is reused, and how long it lives.

``HistoricalPredictor`` keeps, per session (``features.session_id``; handles
without one share the ``"global"`` statistics), exponential moving averages
(EMA, smoothing ``alpha``) of two observed quantities:

* **reuse probability**: each observation is 1 when the handle was reused
  (``access_count > 1`` or ``hit_len > 0`` in its features) and 0 otherwise;
* **lifetime**: the observed lifetime passed to ``update``.

``predict_batch`` answers, per handle, the session's reuse probability and the
*remaining* lifetime ``max(0, avg_lifetime - age)`` where ``age`` is
``extracted_at - created_at``; a session with no observation yet falls back to
the global averages, and a cold predictor to ``default_reuse_prob`` /
``default_lifetime``. ``confidence`` is ``min(1, samples / window_size)``.
At most ``max_sessions`` sessions are kept (least recently updated dropped).

Units are whatever the caller's clock is (seconds for ``KVHandle``
timestamps); the eviction policy ``predictive`` (``eviction/predictive.py``)
feeds it block events and a logical clock.
"""

from __future__ import annotations

import math
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError

__all__ = [
    "FeatureExtractor",
    "HistoricalPredictor",
    "LifetimePrediction",
    "LifetimePredictor",
    "PredictorFeatures",
]

GLOBAL = "global"


def _num(x: Any, name: str, *, lo: float = 0.0) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise KVInvalidTypeError(f"{name} must be a number, got {type(x).__name__}")
    if not math.isfinite(x) or x < lo:
        raise KVInvalidInputError(f"{name} must be a finite number >= {lo}, got {x!r}")
    return float(x)


@dataclass(slots=True)
class PredictorFeatures:
    """What a predictor sees of one handle (the seed's fields)."""

    handle_id: str
    request_id: str
    num_tokens: int
    last_access: float
    access_count: int
    created_at: float
    session_id: str | None = None
    hit_len: int = 0
    is_pinned: bool = False
    device: str = "cpu"
    extracted_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.handle_id = str(self.handle_id)
        for name in ("num_tokens", "access_count", "hit_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise KVInvalidTypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < 0:
                raise KVInvalidInputError(f"{name} must be >= 0, got {v}")
        for name in ("last_access", "created_at", "extracted_at"):
            setattr(self, name, _num(getattr(self, name), name))

    @property
    def reused(self) -> bool:
        """Was the handle reused: accessed more than once, or a prefix-cache hit?"""
        return self.access_count > 1 or self.hit_len > 0

    @classmethod
    def from_handle(
        cls, handle: Any, hit_len: int = 0, extracted_at: float | None = None
    ) -> PredictorFeatures:
        md = handle.metadata or {}
        return cls(
            handle_id=handle.handle_id,
            request_id=str(md.get("request_id", handle.handle_id)),
            session_id=md.get("session_id"),
            num_tokens=handle.num_tokens,
            last_access=handle.last_access_at,
            access_count=getattr(handle, "access_count", 0),
            created_at=handle.created_at,
            hit_len=hit_len or handle.num_cached_tokens,
            is_pinned=handle.pin_count > 0,
            device=handle.device,
            extracted_at=time.time() if extracted_at is None else extracted_at,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictorFeatures:
        return cls(**data)


class FeatureExtractor:
    """Batch ``PredictorFeatures.from_handle`` with one extraction time."""

    def extract_batch(
        self, handles: list[Any], hit_lens: list[int] | None = None
    ) -> list[PredictorFeatures]:
        if hit_lens is not None and len(hit_lens) != len(handles):
            raise KVInvalidInputError(f"{len(hit_lens)} hit_lens for {len(handles)} handles")
        now = time.time()
        lens = hit_lens or [0] * len(handles)
        return [PredictorFeatures.from_handle(h, n, now) for h, n in zip(handles, lens)]


@dataclass(slots=True)
class LifetimePrediction:
    handle_id: str
    predicted_lifetime: float  # remaining, in the caller's time unit
    reuse_probability: float
    confidence: float
    model_version: str
    predicted_at: float = field(default_factory=time.time)
    prediction_id: str = field(default_factory=lambda: str(uuid.uuid4()))


class LifetimePredictor(ABC):
    """A lifetime/reuse predictor: ``predict_batch`` and online ``update``."""

    @abstractmethod
    def predict_batch(self, features: Sequence[PredictorFeatures]) -> list[LifetimePrediction]:
        """One prediction per feature record, in order."""

    @abstractmethod
    def update(self, features: PredictorFeatures, actual_lifetime: float) -> None:
        """Learn from one observed handle (its reuse and its lifetime)."""

    @abstractmethod
    def get_model_version(self) -> str:
        """A version string for logs and predictions."""


class _Stats:
    __slots__ = ("lifetime", "n", "reuse")

    def __init__(self, reuse: float, lifetime: float) -> None:
        self.reuse, self.lifetime, self.n = reuse, lifetime, 0

    def observe(self, reused: float, lifetime: float, alpha: float) -> None:
        # the first sample replaces the prior; later ones blend in with weight alpha
        a = 1.0 if self.n == 0 else alpha
        self.reuse += a * (reused - self.reuse)
        self.lifetime += a * (lifetime - self.lifetime)
        self.n += 1

    def as_dict(self) -> dict[str, float]:
        return {"avg_reuse_prob": self.reuse, "avg_lifetime": self.lifetime, "sample_count": self.n}


class HistoricalPredictor(LifetimePredictor):
    """Per-session EMAs of reuse probability and lifetime (see the module docstring)."""

    VERSION = "historical-ema-1"

    def __init__(
        self,
        window_size: int = 100,
        alpha: float = 0.1,
        default_reuse_prob: float = 0.5,
        default_lifetime: float = 1000.0,
        *,
        max_sessions: int = 65536,
    ) -> None:
        for name, v in (("window_size", window_size), ("max_sessions", max_sessions)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise KVConfigError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
            raise KVConfigError(f"alpha must be in (0, 1], got {alpha!r}")
        if (
            isinstance(default_reuse_prob, bool)
            or not isinstance(default_reuse_prob, int | float)
            or not 0 <= default_reuse_prob <= 1
        ):
            raise KVConfigError(f"default_reuse_prob must be in [0, 1], got {default_reuse_prob!r}")
        if (
            isinstance(default_lifetime, bool)
            or not isinstance(default_lifetime, int | float)
            or not 0 <= default_lifetime < math.inf
        ):
            raise KVConfigError(
                f"default_lifetime must be >= 0 and finite, got {default_lifetime!r}"
            )
        self.window_size = window_size
        self.alpha = float(alpha)
        self.default_reuse_prob = float(default_reuse_prob)
        self.default_lifetime = float(default_lifetime)
        self.max_sessions = max_sessions
        self._global = _Stats(self.default_reuse_prob, self.default_lifetime)
        self._sessions: OrderedDict[Any, _Stats] = OrderedDict()

    # -- learning ------------------------------------------------------------
    def observe(self, session: Any, reused: bool, lifetime: float) -> None:
        """One observation: a handle of ``session`` was (not) reused, after ``lifetime``."""
        s = self._sessions.get(session)
        if s is None:
            s = self._sessions[session] = _Stats(self.default_reuse_prob, self.default_lifetime)
            if len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(session)
        r = 1.0 if reused else 0.0
        s.observe(r, lifetime, self.alpha)
        self._global.observe(r, lifetime, self.alpha)

    def update(self, features: PredictorFeatures, actual_lifetime: float) -> None:
        if not isinstance(features, PredictorFeatures):
            raise KVInvalidTypeError(
                f"features must be PredictorFeatures, got {type(features).__name__}"
            )
        life = _num(actual_lifetime, "actual_lifetime")
        self.observe(features.session_id or GLOBAL, features.reused, life)

    # -- prediction ----------------------------------------------------------
    def reuse_probability(self, session: Any) -> float:
        """The session's reuse EMA (global, then the default, when it has no sample)."""
        s = self._sessions.get(session)
        if s is not None and s.n:
            return s.reuse
        return self._global.reuse

    def _stats_for(self, session: Any) -> _Stats:
        s = self._sessions.get(session)
        if s is not None and s.n:
            return s
        return self._global

    def predict_batch(self, features: Sequence[PredictorFeatures]) -> list[LifetimePrediction]:
        if isinstance(features, PredictorFeatures) or not isinstance(features, Sequence):
            raise KVInvalidTypeError("features must be a sequence of PredictorFeatures")
        if not features:
            raise KVInvalidInputError("features must not be empty")
        for f in features:
            if not isinstance(f, PredictorFeatures):
                raise KVInvalidTypeError(
                    f"features must be PredictorFeatures, got {type(f).__name__}"
                )
        out = []
        now = time.time()
        for f in features:
            s = self._stats_for(f.session_id or GLOBAL)
            age = max(0.0, f.extracted_at - f.created_at)
            out.append(
                LifetimePrediction(
                    handle_id=f.handle_id,
                    predicted_lifetime=max(0.0, s.lifetime - age),
                    reuse_probability=s.reuse,
                    confidence=min(1.0, s.n / self.window_size),
                    model_version=self.VERSION,
                    predicted_at=now,
                )
            )
        return out

    def get_model_version(self) -> str:
        return self.VERSION

    def get_statistics(self) -> dict[str, dict[str, float]]:
        out = {str(k): v.as_dict() for k, v in self._sessions.items()}
        out[GLOBAL] = self._global.as_dict()
        return out

    def reset(self) -> None:
        self._global = _Stats(self.default_reuse_prob, self.default_lifetime)
        self._sessions.clear()
