"""Prefix-cache reuse: a radix tree over token ids whose edges hold K/V slices.

A request looks up the longest cached prefix of its tokens and computes only the rest
(SGLang's RadixAttention, FreeCache-style reuse). Each edge of the tree is a run of
tokens plus their K/V ``[L, 2, kv_heads, len, D]``; K/V of a token depends only on the
tokens before it and its position, so a slice cached at positions ``0 … n-1`` can be
copied into any cache slot.

Eviction is least-recently-used over leaves, under a cap in bytes. A tree belongs to one
:class:`~tokenfx.runtime.generate.Generator` (one model), so reuse never crosses models.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from tokenfx.errors import CacheError

@dataclasses.dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]  # the edge from the parent
    kv: torch.Tensor | None  # [L, 2, Hkv, len(tokens), D]
    parent: "_Node | None"
    children: dict = dataclasses.field(default_factory=dict)  # first token → child
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


class PrefixCache:
    """Radix tree of cached K/V keyed by token ids, with an LRU byte cap.

    ``match(tokens)`` → ``(n, kv[L, 2, Hkv, n, D])`` for the longest cached prefix;
    ``insert(tokens, kv)`` stores K/V for ``tokens`` (sharing what is already cached).
    """

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise CacheError(f"prefix cache capacity must be >= 0 bytes, got {capacity_bytes} "
                             "(prefix_cache_bytes=0 turns the cache off)")
        self.capacity = int(capacity_bytes)
        self.root = _Node((), None, None)
        self.nbytes = 0
        self._clock = itertools.count(1)
        self.hits = self.lookups = 0

    # -- lookup ---------------------------------------------------------------------------------
    def match(self, tokens) -> tuple[int, torch.Tensor | None]:
        tokens = _as_tuple(tokens)
        self.lookups += 1
        node, matched, pieces = self.root, 0, []
        now = next(self._clock)
        while matched < len(tokens):
            child = node.children.get(tokens[matched])
            if child is None:
                break
            common = _common_prefix(child.tokens, tokens[matched:])
            pieces.append(child.kv[:, :, :, :common])
            matched += common
            child.last_used = now
            if common < len(child.tokens):
                break
            node = child
        if not matched:
            return 0, None
        self.hits += 1
        return matched, torch.cat(pieces, dim=3) if len(pieces) > 1 else pieces[0]

    # -- insertion ------------------------------------------------------------------------------
    def insert(self, tokens, kv: torch.Tensor) -> None:
        """Store ``kv`` ``[L, 2, Hkv, len(tokens), D]`` for ``tokens`` (copied; the caller's buffer is free)."""
        tokens = _as_tuple(tokens)
        if kv.shape[3] != len(tokens):
            raise CacheError(f"prefix cache: {len(tokens)} tokens but K/V for {kv.shape[3]}; give K/V "
                             "[L, 2, Hkv, len(tokens), D], one slot per token")
        if not tokens or self.capacity == 0:
            return
        now = next(self._clock)
        node, done = self.root, 0
        while done < len(tokens):
            child = node.children.get(tokens[done])
            if child is None:
                leaf = _Node(tokens[done:], kv[:, :, :, done:].clone(), node, last_used=now)
                node.children[tokens[done]] = leaf
                self.nbytes += leaf.nbytes
                break
            common = _common_prefix(child.tokens, tokens[done:])
            if common < len(child.tokens):
                child = self._split(child, common)
            child.last_used = now
            node, done = child, done + common
        self._evict()

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut ``child``'s edge after ``at`` tokens; return the new upper node."""
        upper = _Node(child.tokens[:at], child.kv[:, :, :, :at].clone(), child.parent, last_used=child.last_used)
        child.parent.children[child.tokens[0]] = upper
        before = child.nbytes
        child.tokens, child.kv, child.parent = child.tokens[at:], child.kv[:, :, :, at:].clone(), upper
        upper.children[child.tokens[0]] = child
        self.nbytes += upper.nbytes + child.nbytes - before
        return upper

    def _evict(self) -> None:
        while self.nbytes > self.capacity:
            leaves = [n for n in self._nodes() if not n.children and n is not self.root]
            if not leaves:
                break
            victim = min(leaves, key=lambda n: n.last_used)
            del victim.parent.children[victim.tokens[0]]
            self.nbytes -= victim.nbytes

    def _nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def __len__(self) -> int:
        """Cached tokens (edge tokens over the whole tree)."""
        return sum(len(n.tokens) for n in self._nodes())

    def clear(self) -> None:
        self.root, self.nbytes = _Node((), None, None), 0


def _as_tuple(tokens) -> tuple[int, ...]:
    if isinstance(tokens, torch.Tensor):
        return tuple(tokens.tolist())
    return tuple(int(t) for t in tokens)


def _common_prefix(a: tuple, b: tuple) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
