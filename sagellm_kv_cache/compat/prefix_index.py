"""``PrefixIndex`` (seed API): a token trie from prefixes to values.

``insert(prefix, value)`` files a value under an exact token prefix;
``longest_prefix_match(tokens)`` returns the value of the longest inserted
prefix of ``tokens`` and its length. Lookups cost O(len(tokens)) dict steps.
This is the handle-level index ``KVCacheManager.register_prefix`` uses; the
block-level prefix cache of the pool (hash chains) is ``PrefixCache`` /
``KVPool.match_prefix``.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any, Generic, TypeVar

from ..errors import KVInvalidInputError, KVInvalidTypeError

__all__ = ["PrefixIndex"]

T = TypeVar("T")
_MISSING = object()


def _tokens(tokens: Any, name: str = "prefix_tokens") -> tuple[int, ...]:
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        raise KVInvalidTypeError(
            f"{name} must be a list or tuple of ints, got {type(tokens).__name__}"
        )
    out = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, Integral):
            raise KVInvalidTypeError(f"{name} must hold ints, got {type(t).__name__}")
        out.append(int(t))
    return tuple(out)


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.value: Any = _MISSING


class PrefixIndex(Generic[T]):
    """Trie-based prefix index: insert/update, exact get, longest-prefix match, removal."""

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0

    def insert(self, prefix_tokens: Sequence[int], value: T) -> None:
        toks = _tokens(prefix_tokens)
        if not toks:
            raise KVInvalidInputError("prefix_tokens must not be empty")
        node = self._root
        for t in toks:
            nxt = node.children.get(t)
            if nxt is None:
                nxt = node.children[t] = _Node()
            node = nxt
        if node.value is _MISSING:
            self._size += 1
        node.value = value

    def _find(self, toks: tuple[int, ...]) -> _Node | None:
        node = self._root
        for t in toks:
            nxt = node.children.get(t)
            if nxt is None:
                return None
            node = nxt
        return node

    def get(self, prefix_tokens: Sequence[int]) -> T | None:
        node = self._find(_tokens(prefix_tokens))
        return None if node is None or node.value is _MISSING else node.value

    def longest_prefix_match(self, tokens: Sequence[int]) -> tuple[T | None, int]:
        node = self._root
        best, best_len = None, 0
        for i, t in enumerate(_tokens(tokens, "tokens")):
            nxt = node.children.get(t)
            if nxt is None:
                break
            node = nxt
            if node.value is not _MISSING:
                best, best_len = node.value, i + 1
        return best, best_len

    def remove(self, prefix_tokens: Sequence[int]) -> bool:
        toks = _tokens(prefix_tokens)
        path = [self._root]
        for t in toks:
            nxt = path[-1].children.get(t)
            if nxt is None:
                return False
            path.append(nxt)
        if not toks or path[-1].value is _MISSING:
            return False
        path[-1].value = _MISSING
        self._size -= 1
        for i in range(len(toks) - 1, -1, -1):  # prune empty branches
            if path[i + 1].children or path[i + 1].value is not _MISSING:
                break
            del path[i].children[toks[i]]
        return True

    def remove_value(self, value: T) -> int:
        """Remove every entry whose value is (``==``) ``value``; returns how many."""
        found: list[tuple[int, ...]] = []
        stack: list[tuple[_Node, tuple[int, ...]]] = [(self._root, ())]
        while stack:
            node, path = stack.pop()
            if node.value is not _MISSING and node.value == value:
                found.append(path)
            stack.extend((c, (*path, t)) for t, c in node.children.items())
        for path in found:
            self.remove(path)
        return len(found)

    def items(self) -> list[tuple[tuple[int, ...], T]]:
        out = []
        stack: list[tuple[_Node, tuple[int, ...]]] = [(self._root, ())]
        while stack:
            node, path = stack.pop()
            if node.value is not _MISSING:
                out.append((path, node.value))
            stack.extend((c, (*path, t)) for t, c in node.children.items())
        return sorted(out)

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        self._root = _Node()
        self._size = 0
