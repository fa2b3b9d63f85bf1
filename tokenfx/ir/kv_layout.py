"""``KVLayout``: what a ``kv_cache`` graph takes and how its cache is shaped, and how such a
graph is exported again after a rewrite (``kv_cache``, ``tree_verify``, ``early_exit``).

The cache is one tensor ``[L, 2, B, Hkv, S, D]`` (layers, K/V, batch, kv-heads, slots, head
dim). A decode graph takes ``input_ids [B, T], positions [B, T], kv_cache, cache_mask [B, S],
token_mask [B, T]`` (``tree_mask [B, T, T]`` after ``tree_verify``) and, with
``cache_update="inplace"``, ``slots [T]`` where it writes the new K/V itself.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from tokenfx.errors import MappingError
from tokenfx.ir.graph import ModelGraph
from tokenfx.ir.rewrite import remove_identity_ops


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What the runtime needs to drive a kv_cache graph."""

    mode: str  # "prefill" | "decode"
    logits: str  # "all" | "last"
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int  # positions the tables cover: prompt + generated must stay below
    dtype: torch.dtype  # of the cache
    inputs: tuple[str, ...]
    cache_update: str = "output"  # "inplace": the graph writes new K/V into kv_cache at ``slots`` itself

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        return (self.layers, 2, batch, self.kv_heads, length, self.head_dim)

    def to_json(self) -> dict:
        """A JSON-able dict (kept beside compiled packages, so a later process needs no capture)."""
        data = dataclasses.asdict(self)
        data["dtype"] = str(self.dtype).removeprefix("torch.")
        data["inputs"] = list(self.inputs)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "KVLayout":
        return cls(**{**data, "dtype": getattr(torch, data["dtype"]), "inputs": tuple(data["inputs"])})


def example_inputs(layout: KVLayout, *, batch: int, tokens: int, past: int, device=None, vocab: int = 2):
    """Inputs for a kv_cache graph: zero cache, full masks, positions after ``past``."""
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    positions = (torch.arange(tokens, device=device) + past).expand(batch, tokens).contiguous()
    token_mask = torch.ones(batch, tokens, dtype=torch.long, device=device)
    if "tree_mask" in layout.inputs:  # tree_verify's graph: a chain (causal) tree
        token_mask = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril().expand(batch, -1, -1).contiguous()
    if layout.mode == "prefill":
        return (ids, positions, token_mask) if "token_mask" in layout.inputs else (ids, positions)
    if layout.cache_update == "inplace":  # the buffer also holds the new tokens' slots
        cache = torch.zeros(layout.cache_shape(batch, past + tokens), dtype=layout.dtype, device=device)
        cache_mask = torch.zeros(batch, past + tokens, dtype=torch.long, device=device)
        cache_mask[:, :past] = 1
        slots = torch.arange(past, past + tokens, device=device)
        return (ids, positions, cache, cache_mask, token_mask, slots)
    cache = torch.zeros(layout.cache_shape(batch, past), dtype=layout.dtype, device=device)
    return (ids, positions, cache, torch.ones(batch, past, dtype=torch.long, device=device), token_mask)


def dynamic_shapes(layout: KVLayout):
    batch = torch.export.Dim("batch", min=1, max=4096)
    tokens = torch.export.Dim("tokens", min=1, max=layout.max_positions)
    if layout.mode == "prefill":
        return tuple({0: batch, 1: tokens} for _ in layout.inputs)
    past = torch.export.Dim("past", min=1, max=layout.max_positions - 1)
    mask = {0: batch, 1: tokens, 2: tokens} if "tree_mask" in layout.inputs else {0: batch, 1: tokens}
    if layout.cache_update == "inplace":
        length = torch.export.Dim("cache_length", min=2, max=layout.max_positions)
        return ({0: batch, 1: tokens}, {0: batch, 1: tokens}, {2: batch, 4: length}, {0: batch, 1: length}, mask,
                {0: tokens})
    return ({0: batch, 1: tokens}, {0: batch, 1: tokens}, {2: batch, 4: past}, {0: batch, 1: past}, mask)


def reexport(gm, graph: ModelGraph, layout: KVLayout, example_ids: torch.Tensor) -> ModelGraph:
    """``gm`` (a rewritten kv graph) exported again with ``layout``'s inputs and dynamic dims, so
    the result is an ordinary captured graph that exports to ONNX and compiles."""
    vocab = int(getattr(graph.config, "vocab_size", 2) or 2)
    args = example_inputs(layout, batch=2, tokens=3, past=5, device=example_ids.device, vocab=vocab)
    shapes = dynamic_shapes(layout)
    try:
        with torch.no_grad():
            ep = torch.export.export(gm, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MappingError(f"kv_cache: the rewritten graph does not export: {first}") from exc
    module = ep.module()
    remove_identity_ops(module)
    drop_guards(module.graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    new = ModelGraph(module, args, {}, shapes, family=graph.family, config=graph.config, source="export")
    new.kv = layout
    return new


def drop_guards(g: torch.fx.Graph) -> None:
    """Erase the unused guard submodules ``torch.export`` leaves in an unlifted module."""
    for node in list(g.nodes):
        if node.op == "call_module" and not node.users:
            g.erase_node(node)
