"""``import_onnx``: an ONNX model → the same ATen-level :class:`ModelGraph` ``tokenfx.capture`` makes.

The model is read with ``onnx`` (external data included, ``onnx.checker`` first), planned,
then traced by ``torch.export`` (non-strict) through a module that runs one translation per
ONNX node (:mod:`tokenfx.frontends.onnx_ops`):

1. read: a corrupt / truncated file or missing external data is one :class:`ModelLoadError`;
2. refuse: every node needs a translation — the first that has none is named with its op
   type and opset, before any work;
3. fold: nodes whose inputs are all constants run once, eagerly (a weight's ``Transpose``, a
   causal-mask table); their results become constants;
4. fuse, so the graph reads like a captured model's: ``MatMul`` by a weight [+ bias ``Add``]
   and ``Gemm`` → ``aten.linear``; ``Softmax`` + ``Where(IsNaN(p), 0, p)`` → ``_safe_softmax``;
   ``Sqrt`` + ``Reciprocal`` (or ``1 / x``) → ``rsqrt``;
5. scope: each node runs inside a submodule named by its scope — the TorchScript exporter's
   node name ``/model/layers.0/self_attn/q_proj/MatMul`` or the dynamo exporter's
   ``pkg.torch.onnx.name_scopes`` metadata — so the graph's ``nn_module_stack`` carries the
   original module paths and the ModelMap recovers blocks exactly as for the PyTorch model;
6. trace: ``torch.export`` with the ONNX inputs' symbolic dims as dynamic dims; initializers
   are parameters (floating point) or buffers of the traced module;
7. config: what decoding needs (vocabulary, positions, stop / pad tokens) from the embedding
   table, HF config files beside the file and its ``tokenfx.config`` metadata
   (:mod:`tokenfx.frontends.onnx_config`), so ``kv_cache`` and the ``Generator`` run the graph.

Before / after for a TorchScript-exported BERT attention query::

    /model/encoder/layer.0/attention/self/query/MatMul  (x, onnx::MatMul_404 [32, 32])
    /model/encoder/layer.0/attention/self/query/Add     (model...query.bias, ·)
      →  aten.linear(x, model.encoder.layer.0.attention.self.query.weight, ...bias)
         nn_module_stack: model.encoder.layer.0.attention.self.query
"""

from __future__ import annotations

import ast
import dataclasses
import keyword
import re
from pathlib import Path

import torch

from tokenfx.errors import ModelLoadError
from tokenfx.frontends import onnx_ops as ops
from tokenfx.frontends.onnx_config import imported_config
from tokenfx.ir.graph import ModelGraph

_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_FOLD_LIMIT = 1 << 24  # elements: a folded constant larger than this stays a traced computation


def import_onnx(model, *, family: str = "onnx") -> ModelGraph:
    """An ONNX model (a path or an ``onnx.ModelProto``) as a :class:`ModelGraph`.

    The graph's module takes the ONNX inputs as keyword tensors (same names; non-identifier
    names are sanitised) and returns the single output, or a tuple in the ONNX output order.
    Exact: the ATen ops compute what the ONNX nodes compute (fused patterns included; the
    fp32 results match onnxruntime to rounding)."""
    proto, source, path = _read(model)
    plan = _Plan(proto, source)
    module = _OnnxModule(plan)
    kwargs, dynamic, module._shared_dims = _example_inputs(plan)
    gm, dynamic = _trace(module, kwargs, dynamic, source)
    family = next((p.value for p in proto.metadata_props if p.key == "tokenfx.family"), family)
    config = imported_config(proto, path)  # vocab, positions, stop tokens: for kv_cache and the Generator
    return ModelGraph(gm, (), kwargs, dynamic, family=family, config=config, source="export")


# -- 1. read ------------------------------------------------------------------------------------------
def _read(model):
    import onnx

    path = None
    if isinstance(model, onnx.ModelProto):
        proto, source = model, "the ONNX model"
    else:
        path = Path(model)
        source = str(path)
        if not path.is_file():
            raise ModelLoadError(f"no such model file: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ModelLoadError(f"{path} is not a valid ONNX file (corrupt or truncated): {_first_line(exc)}") from exc
        _load_external_data(proto, path)
    if not proto.graph.node:
        raise ModelLoadError(f"{source} has an empty graph (a truncated or corrupt file?)")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # ValidationError; a file cut between protobuf fields still parses
        raise ModelLoadError(f"{source} is not a valid ONNX model (corrupt or truncated?): {_first_line(exc)}") from exc
    return proto, source, path


def _load_external_data(proto, path: Path) -> None:
    """Resolve tensors stored beside the model, naming the missing file when one is absent."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, load_external_data_for_tensor, \
        uses_external_data

    for t in _get_all_tensors(proto):
        if not uses_external_data(t):
            continue
        location = ExternalDataInfo(t).location
        data_file = path.parent / location
        if not data_file.is_file():
            raise ModelLoadError(f"{path}: external data file {location!r} (tensor {t.name!r}) is missing; "
                                 f"it must sit next to the model in {path.parent}")
        try:
            load_external_data_for_tensor(t, str(path.parent))
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read external data {location!r} for tensor {t.name!r}: "
                                 f"{_first_line(exc)}") from exc
        del t.external_data[:]
        t.data_location = 0  # TensorProto.DEFAULT


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- 2-5. plan -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Step:
    """One translated op: ``fn(inputs, attrs, opset)`` run inside the scope submodule ``scope``."""

    op_type: str
    name: str  # the ONNX node name (of the first node, for a fused pattern)
    scope: str  # module path ("" = the root)
    inputs: list[str]
    outputs: list[str]
    attrs: dict


class _Plan:
    def __init__(self, proto, source: str):
        from onnx import numpy_helper

        self.source = source
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
        graph = proto.graph
        self._refuse_untranslatable(graph)
        self.consts: dict[str, torch.Tensor] = {t.name: _to_torch(numpy_helper.to_array(t)) for t in graph.initializer}
        init_names = set(self.consts)
        self.inputs = [i for i in graph.input if i.name not in init_names]
        self.outputs = [o.name for o in graph.output]
        self.linear_weights: dict[str, tuple[str, str]] = {}  # const name → (original name, scope) of a linear weight/bias
        nodes = []
        for node in graph.node:
            attrs = {a.name: _attribute(a) for a in node.attribute}
            if node.op_type == "Constant":
                self.consts[node.output[0]] = _constant_value(node, attrs)
                continue
            if node.op_type == "ConstantOfShape" and "value" in attrs:
                # a Python fill value: a tensor in a step's attributes would be fakified by the trace
                attrs["value"] = ops.small_from_tensor(attrs["value"])
            if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
                raise ModelLoadError(f"ONNX node {node.name!r} (op Dropout, opset {self.opset}) outputs its mask, "
                                     "which inference graphs do not have")
            nodes.append(_Step(node.op_type, node.name or node.output[0], _scope_of(node), list(node.input),
                               [o for o in node.output], attrs))
        nodes = self._fold(nodes)
        self.steps = self._fuse_attention(self._fuse(nodes))
        if not any(step.scope for step in self.steps):
            self._scopes_from_weights()

    def _scopes_from_weights(self) -> None:
        """Scopes for a graph whose nodes carry none (the dynamo exporter below opset 18 drops its
        metadata): a node reading a named weight (``model.layers.0.input_layernorm.weight``) is in
        that module; every other node is in the common prefix of its scoped neighbours' modules,
        so attention ops between ``...self.query`` and ``...self.key`` land in ``...self`` and a
        mask built once for all layers lands above the blocks."""
        for step in self.steps:
            owners = [self.linear_weights.get(n, (None,))[0] or _owner(n) for n in step.inputs
                      if n in self.consts and self.consts[n].is_floating_point() and self.consts[n].dim() >= 1]
            owners = [o for o in owners if o]
            if owners:
                step.scope = _common_prefix(owners)
        producers = {o: step for step in self.steps for o in step.outputs}
        consumers: dict[str, list[_Step]] = {}
        for step in self.steps:
            for n in step.inputs:
                consumers.setdefault(n, []).append(step)
        for order in (self.steps, self.steps[::-1]) * 2:
            for step in order:
                if step.scope:
                    continue
                near = [producers[n].scope for n in step.inputs if n in producers]
                near += [c.scope for o in step.outputs for c in consumers.get(o, [])]
                near = [x for x in near if x]
                if near:
                    step.scope = _common_prefix(near)

    def _refuse_untranslatable(self, graph) -> None:
        missing = [n for n in graph.node if n.domain not in ("", "ai.onnx") or
                   (n.op_type != "Constant" and (ops.translation(n.op_type) is None or n.op_type in ops.INTERNAL))]
        if missing:
            first = missing[0]
            domain = first.domain or "ai.onnx"
            more = sorted({n.op_type for n in missing[1:]} - {first.op_type})
            extra = f" (also untranslated: {', '.join(more)})" if more else ""
            raise ModelLoadError(
                f"{self.source}: ONNX node {first.name or first.output[0]!r} (op {first.op_type}, domain {domain}, "
                f"opset {self.opset}) has no translation to ATen{extra}; supported ops: {', '.join(ops.SUPPORTED)}")

    # 3. constant folding: a node whose inputs are all constants runs once, here
    def _fold(self, nodes: list[_Step]) -> list[_Step]:
        kept = []
        for step in nodes:
            names = [n for n in step.inputs if n]
            if names and all(n in self.consts for n in names):
                try:
                    values = [None if not n else _as_value(self.consts[n]) for n in step.inputs]
                    out = _call(step, values, self.opset)
                except Exception:  # noqa: BLE001 — not foldable here; the trace translates it
                    kept.append(step)
                    continue
                outs = out if isinstance(out, tuple) else (out,)
                tensors = [ops.tensor(v) if isinstance(v, ops.Small) else v for v in outs]
                if sum(t.numel() for t in tensors) <= _FOLD_LIMIT:
                    self.consts.update(zip(step.outputs, tensors))
                    continue
            kept.append(step)
        return kept

    def _users(self, steps: list[_Step]) -> dict[str, list[_Step | None]]:
        """Each value's readers among ``steps`` (``None`` for a graph output): what a fusion checks
        before it folds an intermediate away."""
        users: dict[str, list[_Step | None]] = {}
        for step in steps:
            for name in step.inputs:
                users.setdefault(name, []).append(step)
        for name in self.outputs:
            users.setdefault(name, []).append(None)
        return users

    # 4. fusions that give the graph a captured model's ops
    def _fuse(self, nodes: list[_Step]) -> list[_Step]:
        users = self._users(nodes)
        dropped: set[int] = set()
        out = []
        for step in nodes:
            if id(step) in dropped:
                continue
            fused = (self._linear(step, users, dropped) or self._safe_softmax(step, users, dropped)
                     or self._rsqrt(step, users, dropped))
            out.append(fused or step)
        return out

    def _only_user(self, name: str, users) -> _Step | None:
        found = users.get(name, [])
        return found[0] if len(found) == 1 else None

    def _const_rank(self, name: str, rank: int) -> bool:
        t = self.consts.get(name)
        return t is not None and t.dim() == rank and t.is_floating_point()

    def _linear(self, step: _Step, users, dropped) -> _Step | None:
        if step.op_type == "MatMul" and self._const_rank(step.inputs[1], 2) and step.inputs[0] not in self.consts:
            weight = self._derived(step.inputs[1], "T", lambda t: t.t().contiguous(), step.scope, "weight")
            inputs, outputs = [step.inputs[0], weight], step.outputs
            add = self._only_user(step.outputs[0], users)
            if add is not None and add.op_type == "Add":
                other = add.inputs[1] if add.inputs[0] == step.outputs[0] else add.inputs[0]
                out_features = self.consts[weight].shape[0]
                if self._const_rank(other, 1) and self.consts[other].shape[0] == out_features:
                    inputs.append(self._derived(other, "", lambda t: t, step.scope, "bias"))
                    outputs = add.outputs
                    dropped.add(id(add))
            return dataclasses.replace(step, op_type="Linear", inputs=inputs, outputs=outputs, attrs={})
        if step.op_type == "Gemm" and self._const_rank(step.inputs[1], 2) and not step.attrs.get("transA", 0) \
                and step.attrs.get("alpha", 1.0) == 1.0 and step.attrs.get("beta", 1.0) == 1.0:
            if step.attrs.get("transB", 0):
                weight = self._derived(step.inputs[1], "", lambda t: t, step.scope, "weight")
            else:
                weight = self._derived(step.inputs[1], "T", lambda t: t.t().contiguous(), step.scope, "weight")
            inputs = [step.inputs[0], weight]
            if len(step.inputs) > 2 and step.inputs[2]:
                bias = step.inputs[2]
                if not (self._const_rank(bias, 1) and self.consts[bias].shape[0] == self.consts[weight].shape[0]):
                    return None
                inputs.append(self._derived(bias, "", lambda t: t, step.scope, "bias"))
            return dataclasses.replace(step, op_type="Linear", inputs=inputs, attrs={})
        return None

    def _derived(self, name: str, tag: str, fn, scope: str, role: str) -> str:
        """The constant ``fn(consts[name])`` under a new name, remembered as ``scope``'s ``role``."""
        new = f"{name}::{tag}" if tag else name
        if new not in self.consts:
            self.consts[new] = fn(self.consts[name])
        self.linear_weights.setdefault(new, (scope, role))
        return new

    def _safe_softmax(self, step: _Step, users, dropped) -> _Step | None:
        if step.op_type != "Softmax":
            return None
        p = step.outputs[0]
        consumers = users.get(p, [])
        isnan = next((s for s in consumers if s is not None and s.op_type == "IsNaN"), None)
        where = next((s for s in consumers if s is not None and s.op_type == "Where"), None)
        if len(consumers) != 2 or isnan is None or where is None or self._only_user(isnan.outputs[0], users) is not where:
            return None
        cond, zero, value = where.inputs
        zero_t = self.consts.get(zero)
        if cond != isnan.outputs[0] or value != p or zero_t is None or zero_t.numel() != 1 or float(zero_t) != 0.0:
            return None
        dropped.update({id(isnan), id(where)})
        return dataclasses.replace(step, op_type="SafeSoftmax", outputs=where.outputs)

    def _rsqrt(self, step: _Step, users, dropped) -> _Step | None:
        if step.op_type != "Sqrt":
            return None
        user = self._only_user(step.outputs[0], users)
        if user is None:
            return None
        one = self.consts.get(user.inputs[0]) if user.op_type == "Div" and user.inputs[1] == step.outputs[0] else None
        if user.op_type == "Reciprocal" or (one is not None and one.numel() == 1 and float(one) == 1.0):
            dropped.add(id(user))
            return dataclasses.replace(step, op_type="Rsqrt", outputs=user.outputs)
        return None


    # 4b. the exporters' SDPA decomposition back to one SDPA (after _fuse made SafeSoftmax)
    def _fuse_attention(self, steps: list[_Step]) -> list[_Step]:
        """``MatMul(Softmax((q·c₁) @ (kᵀ·c₂) [·c₃] [+ mask]), v)`` → one ``FusedAttention`` step
        (:func:`onnx_ops._attention`: SDPA with ``scale = c₁c₂c₃``), so the graph holds
        ``scaled_dot_product_attention`` as a captured model does and passes that rewrite SDPA
        (token_merge / token_prune's mask, kv_cache) apply. Every intermediate must feed only
        the next; anything else stays as the exporter wrote it."""
        producers = {o: s for s in steps for o in s.outputs}
        users = self._users(steps)

        def sole(name: str, op_types) -> _Step | None:
            """The step making ``name`` when it is of ``op_types`` and ``name`` has one reader."""
            step = producers.get(name)
            ok = step is not None and step.op_type in op_types and len(users.get(name, [])) == 1
            return step if ok else None

        def scalar(name: str) -> float | None:
            t = self.consts.get(name)
            return float(t) if t is not None and t.is_floating_point() and t.numel() == 1 else None

        def scaled(name: str, ops_=("Mul",)):
            """(unscaled input, factor, the Mul/Div step or None) for ``name``."""
            step = sole(name, ops_)
            if step is not None and len(step.inputs) == 2:
                for i in (0, 1):
                    c = scalar(step.inputs[i])
                    if c is not None and (step.op_type == "Mul" or i == 1) and step.inputs[1 - i] not in self.consts:
                        return step.inputs[1 - i], (c if step.op_type == "Mul" else 1.0 / c), step
            return name, 1.0, None

        replaced: dict[int, _Step] = {}
        dropped: set[int] = set()
        for out in steps:
            if out.op_type != "MatMul":
                continue
            softmax = sole(out.inputs[0], ("Softmax", "SafeSoftmax"))
            if softmax is None or out.inputs[1] in self.consts:
                continue
            matched = [softmax]
            scores, mask = softmax.inputs[0], None
            add = sole(scores, ("Add",))
            if add is not None:
                for i in (0, 1):  # the side that is the (scaled) q·kᵀ MatMul; the other is the mask
                    if sole(scaled(add.inputs[i], ("Mul", "Div"))[0], ("MatMul",)) is not None:
                        scores, mask = add.inputs[i], add.inputs[1 - i]
                        break
                else:
                    continue
                matched.append(add)
            scores, c3, step3 = scaled(scores, ("Mul", "Div"))
            qk = sole(scores, ("MatMul",))
            if qk is None:
                continue
            q, c1, step1 = scaled(qk.inputs[0])
            kt, c2, step2 = scaled(qk.inputs[1])
            scale = c1 * c2 * c3
            if not scale > 0 or any(n in self.consts for n in (q, kt)):
                continue
            matched += [s for s in (step3, qk, step1, step2) if s is not None]
            k, k_transposed = kt, True
            transpose = sole(kt, ("Transpose",))
            perm = transpose.attrs.get("perm") if transpose is not None else None
            if perm is not None and len(perm) >= 2:
                # kᵀ = Transpose(x, perm): k is x permuted with the last two axes swapped
                replaced[id(transpose)] = dataclasses.replace(
                    transpose, attrs={**transpose.attrs, "perm": [*perm[:-2], perm[-1], perm[-2]]})
                k_transposed = False
            dropped.update(id(s) for s in matched)
            inputs = [q, k, out.inputs[1]] + ([mask] if mask is not None else [])
            flat = self._flat_transpose(k, producers) if k_transposed else None
            if flat is not None:  # the K before the flatten; _attention checks the shapes at trace time
                inputs = [q, k, out.inputs[1], mask or "", *flat]
            replaced[id(out)] = dataclasses.replace(out, op_type="FusedAttention", inputs=inputs, attrs={
                "scale": scale, "k_transposed": k_transposed, "axis": softmax.attrs.get("axis", -1),
                "safe": softmax.op_type == "SafeSoftmax"})
        return [replaced.get(id(s), s) for s in steps if id(s) not in dropped]

    @staticmethod
    def _flat_transpose(kt: str, producers) -> list[str] | None:
        """The dynamo exporter writes kᵀ as ``Reshape(Transpose(Reshape(k, [-1, S, D]), [0, 2, 1]),
        [B, H, D, S])``: ``[k, Reshape(k)]`` for that form (None otherwise), so attention reads
        ``k`` itself — the K whose GQA repeat ``kv_cache`` sees through — when the shapes agree."""
        outer = producers.get(kt)
        transpose = producers.get(outer.inputs[0]) if outer is not None and outer.op_type == "Reshape" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.attrs.get("perm") != [0, 2, 1]:
            return None
        inner = producers.get(transpose.inputs[0])
        if inner is None or inner.op_type != "Reshape":
            return None
        return [inner.inputs[0], inner.outputs[0]]


def _owner(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``model.layers.0.mlp.up_proj`` ("" for ``val_12``)."""
    if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", name):
        return ""
    return name.rpartition(".")[0]


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _scope_of(node) -> str:
    """The module path an ONNX node came from ("" when it has none)."""
    for prop in node.metadata_props:
        if prop.key == _NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            # [..., 'model.encoder.layer.0.attention.self', 'scaled_dot_product_attention']: the last is the op
            return scopes[-2] if isinstance(scopes, list) and len(scopes) >= 2 else ""
    if node.name.startswith("/"):
        parts = node.name.split("/")[1:-1]  # "/model/layers.0/self_attn/q_proj/MatMul"
        return ".".join(p for p in parts if p)
    return ""


def _attribute(a):
    from onnx import helper, numpy_helper

    value = helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "data_type"):  # a TensorProto (Constant's value, ConstantOfShape's fill)
        return _to_torch(numpy_helper.to_array(value))
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _constant_value(node, attrs) -> torch.Tensor:
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64), ("value_floats", torch.float32),
                       ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise ModelLoadError(f"ONNX Constant node {node.name!r} has no value this importer reads ({sorted(attrs)})")


def _to_torch(array) -> torch.Tensor:
    import numpy as np

    if array.dtype.name == "bfloat16":  # ml_dtypes: reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _as_value(t: torch.Tensor):
    """How a constant reaches a translation: small int vectors and scalars as :class:`Small`."""
    small_int = not t.is_floating_point() and t.dim() <= 1 and t.numel() <= ops.SMALL_NUMEL
    scalar = t.is_floating_point() and t.dim() <= 1 and t.numel() == 1
    return ops.small_from_tensor(t) if small_int or scalar else t


def _call(step: _Step, values, opset):
    fn = ops.translation(step.op_type)
    if step.op_type == "Split":
        return fn(values, step.attrs, opset, len(step.outputs))
    return fn(values, step.attrs, opset)


# -- 6. the traced module --------------------------------------------------------------------------------
class _Scope(torch.nn.Module):
    """A module path of the original model; ops run through it so ``torch.export`` records the path."""

    def forward(self, step: _Step, values, opset: int):
        return _call(step, values, opset)


class _StepError(Exception):
    def __init__(self, step: _Step, opset: int, cause: Exception):
        self.step, self.opset, self.cause = step, opset, cause
        super().__init__(f"ONNX node {step.name!r} (op {step.op_type}, opset {opset}): {_first_line(cause)}")


_ATTR_CLASH = set(dir(torch.nn.Module))


def _module_name(part: str) -> str:
    name = re.sub(r"\W", "_", part) or "_"
    return name + "_" if name in _ATTR_CLASH else name


class _OnnxModule(torch.nn.Module):
    def __init__(self, plan: _Plan):
        super().__init__()
        self._plan_steps = plan.steps
        self._opset = plan.opset
        self._output_names = plan.outputs
        self._input_names = [i.name for i in plan.inputs]
        self._shared_dims: list[list[tuple[str, int]]] = []  # (input, axis) groups that share one dim_param
        self._scope_paths: dict[str, str] = {}
        for step in plan.steps:
            self._scope_paths.setdefault(step.scope, self._ensure_scope(step.scope))
        used = {n for s in plan.steps for n in s.inputs if n in plan.consts} | {n for n in plan.outputs if n in plan.consts}
        self._small: dict[str, ops.Small] = {}
        self._tensor_paths: dict[str, str] = {}
        taken: set[str] = set()
        for name in sorted(used, key=lambda n: (n not in plan.linear_weights, n)):
            value = _as_value(plan.consts[name])
            if isinstance(value, ops.Small):
                self._small[name] = value
                continue
            self._tensor_paths[name] = self._store(name, plan.consts[name], plan.linear_weights.get(name), taken)

    def _ensure_scope(self, path: str) -> str:
        module, parts = self, []
        for part in (p for p in path.split(".") if p):
            attr = _module_name(part)
            parts.append(attr)
            child = module._modules.get(attr)
            if child is None:
                if hasattr(module, attr):  # a parameter of that name: keep the path distinct
                    attr = attr + "_"
                    parts[-1] = attr
                    child = module._modules.get(attr)
                if child is None:
                    child = _Scope()
                    module.add_module(attr, child)
            module = child
        return ".".join(parts)

    def _store(self, name: str, value: torch.Tensor, role, taken: set) -> str:
        """Register a constant under a readable path: its own dotted name, the linear's
        ``<scope>.weight`` / ``.bias``, or ``onnx_constants.<name>``."""
        candidates = []
        if role is not None:
            candidates.append(f"{role[0]}.{role[1]}" if role[0] else role[1])
        if re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", name):
            candidates.append(name)
        candidates.append("onnx_constants." + _module_name(name))
        for path in candidates:
            owner_path, _, leaf = path.rpartition(".")
            leaf = _module_name(leaf)
            owner_path = self._ensure_scope(owner_path) if owner_path else ""
            owner = self.get_submodule(owner_path) if owner_path else self
            full = f"{owner_path}.{leaf}" if owner_path else leaf
            if full in taken or hasattr(owner, leaf):
                continue
            if value.is_floating_point():
                owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
            else:
                owner.register_buffer(leaf, value)
            taken.add(full)
            return full
        suffix = len(taken)
        holder = self.get_submodule(self._ensure_scope("onnx_constants"))
        leaf = f"c{suffix}"
        (holder.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False)) if value.is_floating_point()
         else holder.register_buffer(leaf, value))
        taken.add(f"onnx_constants.{leaf}")
        return f"onnx_constants.{leaf}"

    def _const(self, name: str):
        path = self._tensor_paths[name]
        owner_path, _, leaf = path.rpartition(".")
        owner = self.get_submodule(owner_path) if owner_path else self
        return getattr(owner, leaf)

    def run(self, inputs: dict):
        # one ONNX dim symbol is one size: tell the tracer up front, so a Reshape of one input by
        # another's Shape is not guarded on the example's sizes (batch != 1, ...)
        for group in self._shared_dims:
            (first, axis), *rest = group
            for name, other_axis in rest:
                torch._check(inputs[name].shape[other_axis] == inputs[first].shape[axis])
        env: dict = dict(self._small)
        env.update(inputs)
        for step in self._plan_steps:
            values = []
            for n in step.inputs:
                if not n:
                    values.append(None)
                elif n in env:
                    values.append(env[n])
                else:
                    values.append(self._const(n))
            scope = self._scope_paths[step.scope]
            try:
                out = self.get_submodule(scope)(step, values, self._opset) if scope else _call(step, values, self._opset)
            except _StepError:
                raise
            except Exception as exc:
                raise _StepError(step, self._opset, exc) from exc
            outs = out if isinstance(out, tuple) else (out,)
            env.update(zip(step.outputs, outs))
        results = []
        for name in self._output_names:
            value = env[name] if name in env else self._const(name)
            results.append(ops.tensor(value))
        return results[0] if len(results) == 1 else tuple(results)


# -- inputs, dims and the trace ------------------------------------------------------------------------
def _python_name(name: str, taken: set) -> str:
    ident = re.sub(r"\W", "_", name)
    if not ident or ident[0].isdigit() or keyword.iskeyword(ident):
        ident = "x_" + ident
    while ident in taken:
        ident += "_"
    taken.add(ident)
    return ident


def _example_inputs(plan: _Plan):
    """Example tensors for the ONNX inputs and their ``torch.export`` dims: every symbolic ONNX
    dim (``batch``, ``sequence_length`` …) is a ``Dim``; inputs sharing a symbol share the Dim."""
    dims: dict[str, torch.export.Dim] = {}
    sizes: dict[str, int] = {}
    kwargs, dynamic = {}, {}
    taken: set = set()
    names = {}
    groups: dict[str, list] = {}
    for graph_input in plan.inputs:
        key = _python_name(graph_input.name, taken)
        names[graph_input.name] = key
        tensor_type = graph_input.type.tensor_type
        dtype = ops.DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise ModelLoadError(f"{plan.source}: input {graph_input.name!r} has an element type tokenfx cannot feed "
                                 f"(ONNX type {tensor_type.elem_type})")
        shape, spec = [], {}
        for axis, d in enumerate(tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
                continue
            symbol = d.dim_param or f"{graph_input.name}_{axis}"
            groups.setdefault(symbol, []).append((graph_input.name, axis))
            if symbol not in dims:
                # distinct example sizes (2 for a leading batch, then 16, 17, ...) so export
                # does not read a coincidence of sizes as a relation
                sizes[symbol] = 2 if axis == 0 and not any(v == 2 for v in sizes.values()) else 16 + len(sizes)
                dims[symbol] = torch.export.Dim(_python_name(symbol, set()), min=1)
            spec[axis] = dims[symbol]
            shape.append(sizes[symbol])
        if dtype.is_floating_point:
            value = torch.randn(shape, generator=torch.Generator().manual_seed(len(kwargs))).to(dtype)
        else:
            value = torch.ones(shape, dtype=dtype)  # ids 1 / an all-ones mask: valid for any vocabulary
        kwargs[key] = value
        dynamic[key] = spec or None
    return kwargs, dynamic, [g for g in groups.values() if len(g) > 1]


def _forward_for(names: list[str], onnx_names: list[str]):
    params = ", ".join(names)
    mapping = ", ".join(f"{o!r}: {n}" for o, n in zip(onnx_names, names))
    namespace: dict = {}
    exec(f"def forward(self, {params}):\n    return self.run({{{mapping}}})\n", namespace)  # noqa: S102
    return namespace["forward"]


def _trace(module: _OnnxModule, kwargs: dict, dynamic: dict, source: str):
    from tokenfx.frontends.torch_export import _auto, _constraint_violation
    from tokenfx.ir.rewrite import remove_identity_ops

    cls = type("OnnxGraph", (_OnnxModule,), {"forward": _forward_for(list(kwargs), module._input_names)})
    module.__class__ = cls
    module.eval()
    try:
        with torch.no_grad():
            try:
                ep = torch.export.export(module, (), kwargs, dynamic_shapes=dynamic, strict=False)
            except Exception as exc:
                if not _constraint_violation(exc) or _step_error(exc) is not None:
                    raise
                # the model narrows a dim (a position table's length): let export derive the ranges
                dynamic = _auto(dynamic)
                ep = torch.export.export(module, (), kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        step_error = _step_error(exc)
        if step_error is not None:
            raise ModelLoadError(f"{source}: cannot translate {step_error}") from exc
        raise ModelLoadError(f"{source}: torch.export could not trace the imported graph: {_first_line(exc)}") from exc
    gm = ep.module()
    remove_identity_ops(gm)
    return gm, dynamic


def _step_error(exc: BaseException) -> _StepError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, _StepError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
