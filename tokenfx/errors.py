"""Every error tokenfx raises on bad input, in one place.

Each message names the problem in the user's terms: which model part, which option,
which file. The CLI prints ``str(error)`` on one line and exits 2.
"""

from __future__ import annotations


class TokenfxError(Exception):
    """Base class: an error caused by the user's input, not by a bug in tokenfx."""


class CaptureError(TokenfxError):
    """The model could not be captured into a graph (export failed, bad example inputs)."""


class MappingError(TokenfxError):
    """The transformer structure could not be recovered (no blocks, no attention core ...)."""


class PipelineSyntaxError(TokenfxError):
    """A pipeline string such as ``fuse_norm,token_merge(r=8)`` is malformed."""

    def __init__(self, text: str, position: int, message: str):
        self.text, self.position = text, position
        pointer = " " * position + "^"
        super().__init__(f"pipeline syntax error at position {position}: {message}\n  {text}\n  {pointer}")


class UnknownPassError(TokenfxError):
    """A pass name or a pass option that does not exist."""


class PassOptionError(TokenfxError):
    """A pass option has an impossible value for this graph (e.g. r larger than the tokens)."""


class ModelLoadError(TokenfxError):
    """A model spec (path, bundled name, factory) that cannot be loaded."""


class ExportError(TokenfxError):
    """Writing a graph to .pt2 / .onnx failed."""


class VerificationError(TokenfxError):
    """``verify=True`` found the rewritten graph disagreeing with the original."""


class GenerationError(TokenfxError):
    """Bad generation input: prompt too long, wrong padding, a model that is not a decoder."""


class DiffusionError(GenerationError):
    """A masked-diffusion LM asked to decode left to right or the reverse, a dLLM without a mask
    token, or a generation buffer that does not split into its blocks / rounds."""


class TreeError(TokenfxError):
    """A draft tree that is not a tree: parents out of order, a bad rank path, an unknown template."""


class PassDefinitionError(TokenfxError):
    """A Pass subclass that cannot be registered (e.g. a contract other than exact / bounded / approximate)."""


class OpInputError(TokenfxError):
    """A ``tokenfx::*`` op, or a kernel source to emit for it, given what it does not take: an unknown
    norm kind, an unsupported dtype, an input too short for the token-reduction schedule."""


class CacheError(TokenfxError):
    """A prefix cache (:class:`tokenfx.runtime.kv.PrefixCache`) given what it cannot hold: a
    negative byte cap, K/V whose length differs from its tokens'."""


class TensorParallelError(TokenfxError):
    """Tensor-parallel generation that cannot run: no process group of the right size, ``--tp``
    larger than the devices, a rank that failed (named, with its error), a drafter that does not
    run in lockstep across ranks."""
