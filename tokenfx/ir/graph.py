"""``ModelGraph``: one ATen-level ``torch.fx.GraphModule`` plus what passes need to know.

A ModelGraph owns

- ``gm``: the GraphModule (from ``torch.export`` unlifted, or AOTAutograd's forward graph),
  callable with the captured model's own calling convention;
- ``example_args`` / ``example_kwargs``: real tensors that ran through it;
- ``dynamic_shapes``: the ``torch.export`` spec (batch ``B`` and tokens ``N``) used to capture
  it, so it can be exported again after rewriting;
- ``family`` and ``config``: the model family (``config.model_type`` for Hugging Face models)
  and its config, when known;
- ``structure``: the recovered :class:`~tokenfx.ir.model_map.ModelMap`, built on first use.

Graphs are cheap to clone (the graph is copied, parameters are shared): passes mutate a
clone, never the caller's graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx


@dataclasses.dataclass
class ModelGraph:
    gm: torch.fx.GraphModule
    example_args: tuple = ()
    example_kwargs: dict = dataclasses.field(default_factory=dict)
    dynamic_shapes: Any = None
    family: str = "unknown"
    config: Any = None
    source: str = "export"  # "export" (torch.export) or "aot" (torch.compile backend)
    kv: Any = None  # KVLayout of a graph the kv_cache pass made (its inputs, cache shape, positions)
    _structure: Any = dataclasses.field(default=None, repr=False)

    # -- access ---------------------------------------------------------------------------
    def module(self) -> torch.fx.GraphModule:
        """The runnable module; same calling convention as the captured model."""
        return self.gm

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    @property
    def structure(self):
        """The recovered transformer structure (:class:`ModelMap`), built once and cached."""
        if self._structure is None:
            from tokenfx.ir.model_map import recover_model_map

            self._structure = recover_model_map(self)
        return self._structure

    def invalidate(self) -> None:
        """Call after mutating ``gm.graph`` in place: recompiles and drops the cached map."""
        self.gm.graph.lint()
        self.gm.recompile()
        self._structure = None

    def run_example(self):
        with torch.no_grad():
            return self.gm(*self.example_args, **self.example_kwargs)

    def count(self, target) -> int:
        """How many call_function nodes call ``target`` (an OpOverload or packet)."""
        return sum(1 for n in self.graph.nodes if n.op == "call_function" and _matches(n.target, target))

    # -- copies ---------------------------------------------------------------------------
    def clone(self) -> "ModelGraph":
        """A ModelGraph with its own copy of the graph; parameters and buffers are shared."""
        new_graph = torch.fx.Graph()
        value_map: dict = {}
        out = new_graph.graph_copy(self.gm.graph, value_map)
        new_graph.output(out)
        new_graph._codegen = self.gm.graph._codegen  # signature (pytree specs) is unchanged by passes
        gm = torch.fx.GraphModule(self.gm, new_graph, class_name=type(self.gm).__name__)
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(self.gm, attr):
                setattr(gm, attr, getattr(self.gm, attr))
        gm.meta = dict(getattr(self.gm, "meta", {}))
        return dataclasses.replace(self, gm=gm, _structure=None)


def _matches(node_target, target) -> bool:
    if node_target is target:
        return True
    packet = getattr(node_target, "overloadpacket", None)
    return packet is not None and packet is target


def max_tokens(config) -> int | None:
    """The longest token axis a model's position scheme allows, from its config (BERT guards at
    512, so a dynamic token dim must stop there)."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
