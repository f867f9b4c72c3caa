"""The seed package's face (``isagellm-kv-cache`` 0.5.4.15): its data types, its
``PrefixIndex``, the handle-level ``EvictionManager`` (``eviction_manager``,
imported on first use) and the mixins that give the core classes the seed's
methods.

Nothing here is the core: the pool, the policies and the tiers live in their
own modules; these are the names and signatures a port from the seed expects.
"""

from .models import *  # noqa: F403  (the seed's data types; models.__all__ names them)
from .models import __all__ as _MODELS
from .prefix_index import PrefixIndex as PrefixIndex

__all__ = sorted([*_MODELS, "PrefixIndex"])
