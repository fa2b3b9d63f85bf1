"""IR: ModelGraph, ModelMap (structure recovery), symbolic shapes, dataflow analysis."""

from tokenfx.ir.graph import ModelGraph

__all__ = ["ModelGraph"]
