"""Passes, the pass registry, the pipeline syntax and the PassManager.

Usage::

    from tokenfx.passes.base import PassManager, optimize
    g2 = optimize(g, "fuse_norm")                        # pipeline string
    g2 = optimize(g, [FuseNorm()])                       # or Pass objects
    report = PassManager("fuse_norm", verify=True).run(g) # report.graph, report.passes[i].stats
    result = FuseNorm().run(g)                           # one pass, no re-lint / shape propagation

A pipeline string is ``name(opt=value, ...),name2``; values are ints, floats, booleans,
strings and ``[...]`` / ``(...)`` lists. Errors name the position, the unknown pass or
option, and the valid choices (a ``Literal[...]`` option lists its values).

A pass subclasses :class:`Pass`: a ``name``, a typed ``Options`` dataclass, a ``contract``
("exact", "bounded", "approximate") and ``rewrite(graph) -> PassResult``, which mutates the
graph it is handed. Only two doors lead to ``rewrite`` and both hand it a clone, so the
caller's graph never changes: :meth:`PassManager.run` (the pipeline) and :meth:`Pass.run`
(one pass called directly).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
import types
import typing
from typing import Any, ClassVar

import torch

from tokenfx.errors import (MappingError, PassDefinitionError, PassOptionError, PipelineSyntaxError,
                            UnknownPassError, VerificationError)
from tokenfx.ir.graph import ModelGraph

CONTRACTS = ("exact", "bounded", "approximate")


@dataclasses.dataclass
class PassResult:
    graph: ModelGraph
    matched: list[str] = dataclasses.field(default_factory=list)  # what was rewritten, by model part
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (model part, reason)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class Pass:
    name: ClassVar[str]
    contract: ClassVar[str] = "exact"

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, options: Any = None, **overrides):
        if options is None:
            options = build_options(type(self), overrides)
        else:
            check_choices(type(self), options)  # an Options object built by hand skips the parser
            if overrides:
                built = build_options(type(self), overrides)
                options = dataclasses.replace(options, **{key: getattr(built, key) for key in overrides})
        self.options = options

    def run(self, graph: ModelGraph) -> PassResult:
        """Rewrite a clone of ``graph``; ``graph`` itself is never changed."""
        return self.rewrite(graph.clone())

    def rewrite(self, graph: ModelGraph) -> PassResult:  # pragma: no cover - interface
        """Rewrite ``graph`` in place (it is always a clone: :meth:`run`, :class:`PassManager`)."""
        raise NotImplementedError

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return f"{self.name}({opts})" if opts else self.name


# -- registry ---------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Pass]] = {}
_PASS_MODULES = ("tokenfx.passes.fuse_norm", "tokenfx.passes.kv_cache", "tokenfx.passes.tree_verify",
                  "tokenfx.passes.early_exit", "tokenfx.passes.token_merge",
                  "tokenfx.passes.token_prune", "tokenfx.passes.token_shuffle",
                  "tokenfx.passes.tensor_parallel", "tokenfx.passes.split_overlap")


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass reachable by name from pipeline strings."""
    if cls.contract not in CONTRACTS:
        raise PassDefinitionError(f"pass {cls.name}: contract must be one of {CONTRACTS}, got {cls.contract!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    for module in _PASS_MODULES:
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def build_options(cls: type[Pass], values: dict) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise UnknownPassError(f"pass {cls.name!r} has no option {key!r}; valid options: {valid}")
        kwargs[key] = _coerce(cls.name, key, value, hints[key])
    try:
        return cls.Options(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PassOptionError(f"pass {cls.name!r}: {exc}") from exc


def check_choices(cls: type[Pass], options) -> None:
    """Check every ``Literal[...]`` option of an Options object (the parser's rule, for objects
    built without it)."""
    hints = typing.get_type_hints(cls.Options)
    for field in dataclasses.fields(options):
        if _choices(hints[field.name]):
            _coerce(cls.name, field.name, getattr(options, field.name), hints[field.name])


def _choices(hint) -> tuple:
    """The values a ``Literal[...]`` option (or a union holding one) allows; () for other hints."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(v for typ in typing.get_args(hint) for v in _choices(typ))
    return ()


def _coerce(pass_name: str, key: str, value, hint):
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for typ in allowed:
        if typing.get_origin(typ) is typing.Literal:
            if value in typing.get_args(typ) and type(value) in {type(v) for v in typing.get_args(typ)}:
                return value
            continue
        if typ is type(None) and value is None:
            return None
        if typ is bool and isinstance(value, bool):
            return value
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is str and isinstance(value, str):
            return value
        if typing.get_origin(typ) in (list, tuple) and isinstance(value, (list, tuple)):
            return typing.get_origin(typ)(value)
    choices = _choices(hint) + ((None,) if type(None) in allowed else ())
    if choices and all(typing.get_origin(t) is typing.Literal or t is type(None) for t in allowed):
        listed = ", ".join(repr(v) for v in choices)  # a choice option: name the values it allows
        raise PassOptionError(f"{pass_name}: {key} must be {listed if len(choices) == 1 else 'one of ' + listed}; "
                              f"got {value!r}")
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise PassOptionError(f"pass {pass_name!r} option {key!r} must be {names}, got {value!r}")


# -- pipeline syntax ----------------------------------------------------------------------------------
def parse_pipeline(text: str) -> list[Pass]:
    """``"fuse_norm,token_merge(r=8)"`` → pass objects, with positioned syntax errors."""
    registry = registered_passes()
    parser = _Parser(text)
    items = parser.pipeline()
    passes = []
    for name, position, options in items:
        if name not in registry:
            valid = ", ".join(registry)
            raise UnknownPassError(f"unknown pass {name!r} at position {position}; valid passes: {valid}")
        passes.append(registry[name](build_options(registry[name], options)))
    return passes


class _Parser:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def error(self, message: str):
        raise PipelineSyntaxError(self.text, self.i, message)

    def skip(self):
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, ch: str):
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            self.error(f"expected {ch!r}, found {found}")
        self.i += 1

    def ident(self) -> str:
        self.skip()
        start = self.i
        while self.i < len(self.text) and (self.text[self.i].isalnum() or self.text[self.i] == "_"):
            self.i += 1
        if start == self.i:
            found = repr(self.text[self.i]) if self.i < len(self.text) else "end of text"
            self.error(f"expected a pass name, found {found}")
        return self.text[start:self.i]

    def pipeline(self):
        items = []
        if not self.text.strip():
            self.error("empty pipeline")
        while True:
            self.skip()
            position = self.i
            name = self.ident()
            options = {}
            if self.peek() == "(":
                self.i += 1
                if self.peek() != ")":
                    while True:
                        self.skip()
                        key = self.ident()
                        self.expect("=")
                        if key in options:
                            self.error(f"option {key!r} given twice")
                        options[key] = self.value()
                        if self.peek() == ",":
                            self.i += 1
                            continue
                        break
                self.expect(")")
            items.append((name, position, options))
            if self.peek() == ",":
                self.i += 1
                continue
            if self.peek():
                self.error(f"expected ',' between passes, found {self.peek()!r}")
            return items

    def value(self):
        ch = self.peek()
        if ch in "[(":
            close = "]" if ch == "[" else ")"
            self.i += 1
            out = []
            if self.peek() != close:
                while True:
                    out.append(self.value())
                    if self.peek() == ",":
                        self.i += 1
                        continue
                    break
            self.expect(close)
            return out if close == "]" else tuple(out)
        if ch in "'\"":
            end = self.text.find(ch, self.i + 1)
            if end < 0:
                self.error("unterminated string")
            s = self.text[self.i + 1:end]
            self.i = end + 1
            return s
        self.skip()
        start = self.i
        while self.i < len(self.text) and self.text[self.i] not in ",()[]" and not self.text[self.i].isspace():
            self.i += 1
        token = self.text[start:self.i]
        if not token:
            self.i = start
            self.error("expected a value")
        lowered = token.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        for cast in (int, float):
            try:
                return cast(token)
            except ValueError:
                pass
        if token.replace("_", "").replace(".", "").isalnum():
            return token
        self.i = start
        self.error(f"cannot read value {token!r}")


# -- manager -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PassReport:
    name: str
    description: str
    contract: str
    seconds: float
    nodes_added: int
    nodes_removed: int
    matched: list[str]
    refused: list[tuple[str, str]]
    stats: dict
    max_abs_error: float | None = None
    tolerance: float | None = None

    @property
    def verified(self) -> bool | None:
        if self.max_abs_error is None:
            return None
        return self.max_abs_error <= self.tolerance


@dataclasses.dataclass
class PipelineReport:
    graph: ModelGraph
    passes: list[PassReport]



def tolerance_for(output: torch.Tensor, contract: str, depth: int = 1) -> float:
    """Absolute tolerance for an output of this dtype and magnitude (exact = reordering only).

    ``depth``: the transformer blocks between the rewrite and the output. A reordered reduction
    inside one block perturbs the residual stream by a few ulps, and every later block carries
    (and may amplify) that perturbation, so the bound grows with depth (measured: fuse_norm on the
    6-block MiniLM at one thread differs by 8.3e-5 at output scale 6, 1.8x the one-block bound)."""
    eps = torch.finfo(output.dtype).eps if output.is_floating_point() else 0.0
    scale = float(output.abs().max()) if output.numel() and output.is_floating_point() else 1.0
    factor = {"exact": 64.0, "bounded": 4096.0, "approximate": float("inf")}[contract]
    return factor * eps * max(scale, 1.0) * max(depth, 1)


def _depth(graph: ModelGraph) -> int:
    """The graph's transformer blocks (1 when it has no map): the depth a tolerance scales with."""
    try:
        return len(graph.structure.blocks) or 1
    except MappingError:
        return 1


class PassManager:
    def __init__(self, pipeline, *, verify: bool = False, strict: bool = True):
        self.passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise UnknownPassError(f"pipeline entries must be Pass objects or a pipeline string, got {type(p).__name__}")
        self.verify, self.strict = verify, strict

    def run(self, graph: ModelGraph) -> PipelineReport:
        from tokenfx.ir.shapes import propagate

        reports = []
        current = graph
        for p in self.passes:
            work = current.clone()  # the one clone a pipeline step makes: passes rewrite what they are handed
            before = set(work.graph.nodes)
            start = time.perf_counter()
            result = p.rewrite(work)
            new = result.graph
            # values a later pass builds on (a token reduction chain's state) stay, even if unread now
            new.gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.meta.get("tokenfx_keep", False))
            new.invalidate()  # lint + recompile
            propagate(new.gm)  # shapes agree with the rewritten graph
            seconds = time.perf_counter() - start
            after = set(new.graph.nodes)
            report = PassReport(p.name, p.describe(), p.contract, seconds, len(after - before), len(before - after),
                                result.matched, result.refused, result.stats)
            if self.verify:
                # each pass is judged against the graph it was given, with its own contract
                if hasattr(p, "verify_outputs"):  # a pass that changes the signature pairs the outputs itself
                    pairs = p.verify_outputs(current, new)
                    reference, outputs = [r for r, _ in pairs], [o for _, o in pairs]
                else:
                    reference = _flat_outputs(current.run_example())
                    outputs = _flat_outputs(new.run_example())
                if len(reference) != len(outputs):
                    raise VerificationError(f"pass {p.name}: the graph returns {len(outputs)} outputs, not {len(reference)}")
                errors, tols = [], []
                depth = _depth(current)
                for ref, out in zip(reference, outputs):
                    if ref.shape != out.shape:
                        raise VerificationError(f"pass {p.name}: output shape changed from {tuple(ref.shape)} to {tuple(out.shape)}")
                    if ref.is_floating_point():
                        errors.append(float((ref.float() - out.float()).abs().max()) if ref.numel() else 0.0)
                        tols.append(tolerance_for(ref, p.contract, depth))
                    else:
                        errors.append(0.0 if torch.equal(ref, out) else float("inf"))
                        tols.append(0.0)
                worst = max(range(len(errors)), key=lambda i: errors[i] - tols[i]) if errors else None
                report.max_abs_error = errors[worst] if worst is not None else 0.0
                report.tolerance = tols[worst] if worst is not None else 0.0
                if self.strict and not report.verified:
                    raise VerificationError(
                        f"pass {p.name} ({p.contract}) changed the output by {report.max_abs_error:.3g}, "
                        f"more than its tolerance {report.tolerance:.3g}")
            reports.append(report)
            current = new
        return PipelineReport(current, reports)


def _flat_outputs(out) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x.detach() for x in leaves if isinstance(x, torch.Tensor)]


def optimize(graph: ModelGraph, pipeline, *, verify: bool = False) -> ModelGraph:
    """Run ``pipeline`` (a string or Pass objects) on a clone of ``graph``; the rewritten graph.
    ``tokenfx.optimize`` also takes an ``nn.Module`` and captures it first."""
    if not isinstance(graph, ModelGraph):
        raise PassOptionError(f"optimize runs on a ModelGraph, got {type(graph).__name__}; capture the model first "
                              "(tokenfx.capture), or call tokenfx.optimize(model, pipeline, example_inputs=...)")
    return PassManager(pipeline, verify=verify).run(graph).graph
