"""``speculate=`` strings to drafters (:func:`make_drafter`). Each drafter proposes a token
tree per row (:class:`~tokenfx.runtime.speculative.decode.Draft`) and lives in its own module:

- ``"recycling"`` — :class:`~tokenfx.runtime.speculative.recycling.TokenRecycling`: an
  adjacency matrix of each token's top-k next tokens, recycled from every verify step;
  drafts walk a static template tree.
- ``"lookup"`` — :class:`~tokenfx.runtime.speculative.prompt_lookup.PromptLookup`: n-gram
  matches in the row's own text, merged into a trie.
- ``"draft[:MODEL]"``, ``"draft-tree[:MODEL]"``, ``"dynamic[:MODEL]"`` —
  :class:`~tokenfx.runtime.speculative.draft_model.DraftModel`: a smaller model of the same
  tokenizer with its own KV cache (a chain, a top-k tree, or DySpec's dynamic tree).
- ``"self[:E|auto]"``, ``"self:adapter"``, ``"adapter:FILE"`` —
  :class:`~tokenfx.runtime.speculative.self_spec.SelfSpeculation`: the target's own first
  blocks draft in the target's own cache (with Kangaroo's exit adapter, or DEL's choice).
"""

from __future__ import annotations

from tokenfx.errors import GenerationError
from tokenfx.runtime.speculative.decode import Drafter


def make_drafter(spec, *, tree=None) -> Drafter:
    """A Drafter from ``speculate=``: a Drafter object, or ``"recycling"``, ``"lookup"``, ``"draft"``,
    ``"draft:<model spec>"``, ``"draft-tree[:<model spec>]"``, ``"dynamic[:<model spec>]"``, ``"self[:<layer>|auto|adapter]"``, ``"adapter:<file>"`` (a Kangaroo exit adapter, run inside
    self-speculation; ``self:adapter``: the one trained for the model).
    ``tree``: a :class:`~tokenfx.ir.tree.Tree` template for recycling. A draft model's Generator
    is built by the target's (:meth:`~tokenfx.runtime.generate.Generator.sibling`), compiled as it is."""
    if isinstance(spec, Drafter):
        return spec
    if not isinstance(spec, str):
        raise GenerationError(f"speculate must be a string or a Drafter, got {type(spec).__name__}")
    name, _, arg = spec.partition(":")
    if name == "recycling":
        from tokenfx.runtime.speculative.recycling import TokenRecycling

        return TokenRecycling(tree=tree)
    if name == "lookup":
        from tokenfx.runtime.speculative.prompt_lookup import PromptLookup

        return PromptLookup()
    if name in ("draft", "draft-tree", "dynamic"):
        from tokenfx.runtime.speculative.draft_model import DraftModel

        mode = {"draft": "chain", "draft-tree": "tree", "dynamic": "dynamic"}[name]
        return DraftModel(arg or "tokenfx:tiny-code-draft", mode=mode)
    if name == "adapter" or spec == "self:adapter":
        from tokenfx.runtime.speculative.self_spec import SelfSpeculation

        if name == "adapter" and not arg:
            raise GenerationError("speculate='adapter:<file>': give the exit adapter's .safetensors file (or "
                                  "speculate='self:adapter' for the one trained for the model)")
        return SelfSpeculation(adapter=arg if name == "adapter" else "find")
    if name == "self":
        from tokenfx.runtime.speculative.self_spec import SelfSpeculation

        if arg in ("", "auto"):
            return SelfSpeculation(arg or None)
        try:
            layer = int(arg)
        except ValueError:
            raise GenerationError(f"speculate='self:{arg}': the exit layer must be a number or 'auto'") from None
        return SelfSpeculation(layer)
    raise GenerationError(f"unknown speculate={spec!r}; choose recycling, lookup, draft[:MODEL], draft-tree[:MODEL], "
                          "dynamic[:MODEL], self[:LAYER|auto|adapter], adapter:FILE or pass a Drafter")
