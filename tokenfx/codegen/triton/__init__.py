"""Triton kernels for the tokenfx::* ops, one file per kernel family (imported lazily)."""
