"""Lazy public names for a package: ``from pkg import Name`` imports ``Name``'s
submodule on first use, so importing the package itself stays light.

Used by ``sagellm_kv_cache``, ``sagellm_kv_cache.observability`` and ``sim``::

    _LAZY = {"KVPool": "pool", ...}          # public name -> submodule defining it
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``.

    ``__getattr__(name)`` imports ``package.<table[name]>`` and returns its
    ``name``, caching it in the package so the next access is a plain lookup;
    a name not in ``table`` raises ``AttributeError``. ``__dir__`` lists the
    package's globals and every lazy name.
    """
    module = sys.modules[package]

    def __getattr__(name: str) -> Any:
        sub = table.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{sub}", package), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(table))

    return __getattr__, __dir__
