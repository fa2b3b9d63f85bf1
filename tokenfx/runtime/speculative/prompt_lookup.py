"""Prompt lookup decoding as a tree: n-gram match of the last tokens in the row's own text
(prompt and generated, largest n first); the continuations after the most recent matches
form a trie. ``speculate="lookup"``.
"""

from __future__ import annotations

import torch

from tokenfx.errors import GenerationError
from tokenfx.runtime.speculative.decode import Draft, Drafter, State


class PromptLookup(Drafter):
    """Prompt lookup decoding as a tree: continuations of the most recent n-gram matches."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, length: int = 10, branches: int = 3):
        if not 1 <= min_ngram <= max_ngram:
            raise GenerationError(f"lookup: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.length, self.branches = max_ngram, min_ngram, length, branches
        self.max_nodes = 1 + length * branches

    def propose(self, state: State) -> Draft:
        rows = []
        for b in range(state.tokens.shape[0]):
            seq = state.row(b)
            continuations = [] if bool(state.finished[b]) else self._continuations(seq)
            rows.append(_trie(int(seq[-1]), continuations, min(self.max_nodes, state.max_nodes)))
        return Draft.stack(rows, state.tokens.device)

    def _continuations(self, seq: torch.Tensor) -> list[list[int]]:
        found: list[list[int]] = []
        n_tokens = seq.numel()
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            suffix = seq[-n:]
            windows = seq[:-1].unfold(0, n, 1)  # every earlier n-gram (not the suffix itself)
            hits = torch.nonzero((windows == suffix).all(1)).flatten().tolist()
            for start in reversed(hits):  # most recent first
                cont = seq[start + n:start + n + self.length].tolist()
                if cont and cont not in found:
                    found.append(cont)
                if len(found) >= self.branches:
                    return found
            if found:
                return found
        return found


def _trie(root: int, continuations: list[list[int]], max_nodes: int) -> tuple[list[int], list[int]]:
    """Merge continuations into a tree under ``root``: (tokens, parents) in topological order."""
    tokens, parents = [root], [-1]
    children: dict[tuple[int, int], int] = {}
    for cont in continuations:
        node = 0
        for tok in cont:
            key = (node, tok)
            if key not in children:
                if len(tokens) >= max_nodes:
                    break
                children[key] = len(tokens)
                tokens.append(tok)
                parents.append(node)
            node = children[key]
    return tokens, parents
