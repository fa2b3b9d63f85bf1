"""The ONNX → ATen translation table: one small function per ONNX op type.

Each translation takes the node's input values and its attributes and returns its output
value(s) by calling torch (so ``torch.export`` records the ATen ops they mean). A value is a
``torch.Tensor`` or a :class:`Small` — an int64 (or scalar) tensor known while tracing,
whose elements may be symbolic sizes. Shapes flow as Smalls (``Shape → Gather → Concat →
Reshape``), so a ``Reshape`` receives Python ints and SymInts, never a data-dependent tensor;
a scalar constant reaches an op as a Python number (``x.pow(2)``, ``x + 1e-6``), which is also
the form the ModelMap's patterns (decomposed RMSNorm's ``eps``) expect.

Semantics follow the ONNX operator spec (onnx.ai/onnx/operators) at opsets 13-21; attribute
defaults are the spec's. ``TRANSLATIONS[op_type](inputs, attrs, opset)`` is the table.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

# ONNX TensorProto.DataType → torch dtype (the types transformer exports use)
DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
          9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16}

SMALL_NUMEL = 64  # int constants up to this size (rank <= 1) are kept as Python values while tracing


@dataclasses.dataclass(frozen=True)
class Small:
    """A rank-0 or rank-1 tensor known while tracing: ``values`` are Python numbers or SymInts."""

    values: tuple
    rank: int  # 0 or 1
    dtype: torch.dtype

    @property
    def shape(self) -> tuple:
        return () if self.rank == 0 else (len(self.values),)

    @property
    def scalar(self):
        return self.values[0]

    def is_concrete(self) -> bool:
        return all(isinstance(v, (int, float, bool)) for v in self.values)


def small_from_tensor(t: torch.Tensor) -> Small:
    return Small(tuple(t.reshape(-1).tolist()), t.dim(), t.dtype)


def tensor(value) -> torch.Tensor:
    """A value as a tensor: a Small becomes a constant (or, with SymInts, a traced stack)."""
    if isinstance(value, torch.Tensor):
        return value
    if value.is_concrete():
        return torch.tensor(value.values if value.rank else value.scalar, dtype=value.dtype)
    parts = [torch.full((), v, dtype=value.dtype) for v in value.values]
    return torch.stack(parts) if value.rank else parts[0]


def ints(value) -> list:
    """A shape-like input (Small) as a list of Python ints / SymInts."""
    if isinstance(value, Small):
        return [int(v) if isinstance(v, (bool, float)) else v for v in value.values]
    raise DataDependent("a shape input computed from tensor data")


class DataDependent(Exception):
    """A translation needs a value known while tracing (a shape, axes) but got tensor data."""


def _py_scalar(value):
    """A single-element Small as a Python number, for ``tensor <op> scalar`` (else None)."""
    if isinstance(value, Small) and len(value.values) == 1:
        v = value.scalar
        return float(v) if value.dtype.is_floating_point and isinstance(v, (int, float)) else v
    return None


def _cast_value(v, dtype: torch.dtype):
    if dtype == torch.bool:
        return bool(v) if isinstance(v, (int, float, bool)) else v != 0
    if dtype.is_floating_point:
        return float(v) if isinstance(v, (int, float, bool)) else torch.sym_float(v)
    if isinstance(v, float):
        return int(v)  # ONNX Cast float → int truncates toward zero, as int() does
    return int(v) if isinstance(v, bool) else v


# -- registry ---------------------------------------------------------------------------------------
TRANSLATIONS: dict[str, Callable] = {}


def onnx_op(*names: str):
    def register(fn):
        for name in names:
            TRANSLATIONS[name] = fn
        return fn

    return register


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# -- elementwise ------------------------------------------------------------------------------------
def _broadcast_small(fn, a: Small, b: Small, dtype) -> Small:
    av, bv = a.values, b.values
    if len(av) == 1 and len(bv) != 1:
        av = av * len(bv)
    if len(bv) == 1 and len(av) != 1:
        bv = bv * len(av)
    return Small(tuple(fn(x, y) for x, y in zip(av, bv)), max(a.rank, b.rank), dtype)


def _int_div(x, y):
    # ONNX integer Div truncates toward zero
    if isinstance(x, int) and isinstance(y, int):
        q = abs(x) // abs(y)
        return q if (x >= 0) == (y >= 0) else -q
    return x // y  # SymInt sizes are non-negative


_BINARY = {
    "Add": (operator.add, torch.add), "Sub": (operator.sub, torch.sub), "Mul": (operator.mul, torch.mul),
    "Div": (None, None), "Pow": (operator.pow, torch.pow),
    "Equal": (operator.eq, torch.eq), "Less": (operator.lt, torch.lt), "LessOrEqual": (operator.le, torch.le),
    "Greater": (operator.gt, torch.gt), "GreaterOrEqual": (operator.ge, torch.ge),
    "And": (lambda x, y: bool(x) and bool(y), torch.logical_and), "Or": (lambda x, y: bool(x) or bool(y), torch.logical_or),
    "Xor": (lambda x, y: bool(x) != bool(y), torch.logical_xor), "Mod": (operator.mod, torch.remainder),
}
_COMPARE = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor"}
# commutative ops take a Small on either side as a Python scalar; the others only on the right;
# torch's logical ops take no scalars
_COMMUTATIVE = {"Add", "Mul", "Equal"}
_SCALAR_OK = {"Add", "Sub", "Mul", "Pow", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Mod"}


def _binary(op_type: str):
    small_fn, torch_fn = _BINARY[op_type]

    def translate(inputs, attrs, opset):
        a, b = inputs
        out_dtype = torch.bool if op_type in _COMPARE else (a.dtype if op_type == "Pow" else None)
        if isinstance(a, Small) and isinstance(b, Small):
            dtype = out_dtype or a.dtype
            if op_type == "Div":
                fn = operator.truediv if a.dtype.is_floating_point else _int_div
            elif op_type == "Mod":
                fn = math.fmod if attrs.get("fmod", 0) else operator.mod
            else:
                fn = small_fn
            return _broadcast_small(fn, a, b, dtype)
        if op_type == "Div":
            a_t = tensor(a) if not isinstance(a, torch.Tensor) else a
            integral = not a_t.dtype.is_floating_point
            sb = _py_scalar(b)
            other = sb if sb is not None and isinstance(b, Small) and b.rank <= a_t.dim() else tensor(b)
            return torch.div(a_t, other, rounding_mode="trunc") if integral else torch.div(a_t, other)
        if op_type == "Mod" and attrs.get("fmod", 0):
            return torch.fmod(tensor(a), tensor(b))
        if op_type not in _SCALAR_OK:
            return torch_fn(tensor(a), tensor(b))
        if isinstance(b, Small) and isinstance(a, torch.Tensor) and b.rank <= a.dim() and _py_scalar(b) is not None:
            return torch_fn(a, _py_scalar(b))
        if op_type in _COMMUTATIVE and isinstance(a, Small) and isinstance(b, torch.Tensor) and a.rank <= b.dim() \
                and _py_scalar(a) is not None:
            return torch_fn(b, _py_scalar(a))
        a_t, b_t = tensor(a), tensor(b)
        if op_type == "Pow" and b_t.dtype != a_t.dtype:
            return torch.pow(a_t, b_t).to(a_t.dtype)  # ONNX Pow keeps the base's type
        return torch_fn(a_t, b_t)

    return translate


for _name in _BINARY:
    TRANSLATIONS[_name] = _binary(_name)


def _unary(torch_fn, small_fn=None):
    def translate(inputs, attrs, opset):
        (x,) = inputs
        if isinstance(x, Small) and small_fn is not None and x.is_concrete():
            return Small(tuple(small_fn(v) for v in x.values), x.rank, x.dtype)
        return torch_fn(tensor(x))

    return translate


for _name, _fns in {
    "Neg": (torch.neg, operator.neg), "Abs": (torch.abs, abs), "Sqrt": (torch.sqrt, math.sqrt),
    "Reciprocal": (torch.reciprocal, lambda v: 1.0 / v), "Exp": (torch.exp, math.exp), "Log": (torch.log, math.log),
    "Erf": (torch.erf, math.erf), "Tanh": (torch.tanh, math.tanh), "Sigmoid": (torch.sigmoid, None),
    "Relu": (torch.relu, lambda v: max(v, 0)), "Cos": (torch.cos, math.cos), "Sin": (torch.sin, math.sin),
    "Floor": (torch.floor, math.floor), "Ceil": (torch.ceil, math.ceil), "Not": (torch.logical_not, operator.not_),
    "IsNaN": (torch.isnan, None), "Softplus": (F.softplus, None), "Rsqrt": (torch.rsqrt, lambda v: 1.0 / math.sqrt(v)),
}.items():
    TRANSLATIONS[_name] = _unary(*_fns)


@onnx_op("IsInf")
def _isinf(inputs, attrs, opset):
    x = tensor(inputs[0])
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    if pos and neg:
        return torch.isinf(x)
    return torch.isposinf(x) if pos else torch.isneginf(x)


@onnx_op("Clip")
def _clip(inputs, attrs, opset):
    """``clamp``; bounds are inputs from opset 11 (either may be absent), attributes before."""
    x = tensor(inputs[0])
    if opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        bounds = [inputs[i] if len(inputs) > i else None for i in (1, 2)]
        low, high = (None if b is None else _py_scalar(b) if isinstance(b, Small) else tensor(b) for b in bounds)
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        return torch.clamp(x, low, high)
    return torch.clamp(x, min=low, max=high)  # a pooling's clamp(min=1e-9) stays aten.clamp(x, 1e-9)


@onnx_op("Identity")
def _identity(inputs, attrs, opset):
    return inputs[0]


def _variadic(small_fn, torch_fn):
    def translate(inputs, attrs, opset):
        if all(isinstance(v, Small) for v in inputs):
            out = inputs[0]
            for v in inputs[1:]:
                out = _broadcast_small(small_fn, out, v, out.dtype)
            return out
        out = tensor(inputs[0])
        for v in inputs[1:]:
            out = torch_fn(out, tensor(v).to(out.dtype))
        return out

    return translate


TRANSLATIONS["Max"] = _variadic(lambda x, y: torch.sym_max(x, y), torch.maximum)
TRANSLATIONS["Min"] = _variadic(lambda x, y: torch.sym_min(x, y), torch.minimum)
TRANSLATIONS["Sum"] = _variadic(operator.add, torch.add)


@onnx_op("Gelu")
def _gelu(inputs, attrs, opset):
    return F.gelu(tensor(inputs[0]), approximate=attrs.get("approximate", "none"))


def _softmax_like(fn):
    def translate(inputs, attrs, opset):
        x = tensor(inputs[0])
        axis = attrs.get("axis", -1 if opset >= 13 else 1)
        if opset < 13 and _axis(axis, x.dim()) != x.dim() - 1:
            raise DataDependent("Softmax before opset 13 over a non-last axis (flattened semantics)")
        return fn(x, axis)

    return translate


TRANSLATIONS["Softmax"] = _softmax_like(torch.softmax)
TRANSLATIONS["LogSoftmax"] = _softmax_like(torch.log_softmax)
# Softmax followed by Where(IsNaN(p), 0, p) — what both torch exporters emit for SDPA — is
# exactly the softmax that gives 0 for a fully masked row (the importer fuses the pattern)
TRANSLATIONS["SafeSoftmax"] = _softmax_like(lambda x, axis: torch.ops.aten._safe_softmax(x, axis))


@onnx_op("Where")
def _where(inputs, attrs, opset):
    c, x, y = inputs
    if all(isinstance(v, Small) for v in inputs):
        n = max(len(c.values), len(x.values), len(y.values))
        pick = [(c.values * n)[i] if len(c.values) == 1 else c.values[i] for i in range(n)]
        xs = x.values * n if len(x.values) == 1 else x.values
        ys = y.values * n if len(y.values) == 1 else y.values
        return Small(tuple(a if bool(p) else b for p, a, b in zip(pick, xs, ys)), max(c.rank, x.rank, y.rank), x.dtype)
    ct = tensor(c)
    xs, ys = _py_scalar(x), _py_scalar(y)
    if isinstance(x, Small) and isinstance(y, Small):
        return torch.where(ct, tensor(x), tensor(y))
    xv = xs if isinstance(x, Small) and x.rank <= ct.dim() and xs is not None else tensor(x)
    yv = ys if isinstance(y, Small) and y.rank <= ct.dim() and ys is not None else tensor(y)
    return torch.where(ct, xv, yv)


@onnx_op("Cast")
def _cast(inputs, attrs, opset):
    (x,) = inputs
    dtype = DTYPES[attrs["to"]]
    if isinstance(x, Small):
        return Small(tuple(_cast_value(v, dtype) for v in x.values), x.rank, dtype)
    return x.to(dtype)


@onnx_op("CastLike")
def _cast_like(inputs, attrs, opset):
    x, like = inputs
    dtype = like.dtype
    if isinstance(x, Small):
        return Small(tuple(_cast_value(v, dtype) for v in x.values), x.rank, dtype)
    return x.to(dtype)


# -- shapes -----------------------------------------------------------------------------------------
@onnx_op("Shape")
def _shape(inputs, attrs, opset):
    x = inputs[0]
    dims = tuple(x.shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return Small(tuple(dims[start:end]), 1, torch.int64)


@onnx_op("Size")
def _size(inputs, attrs, opset):
    x = inputs[0]
    return Small((x.numel() if isinstance(x, torch.Tensor) else len(x.values),), 0, torch.int64)


@onnx_op("Reshape")
def _reshape(inputs, attrs, opset):
    x, shape = inputs
    target = ints(shape)
    dims = list(x.shape)
    if not attrs.get("allowzero", 0):
        target = [dims[i] if isinstance(t, int) and t == 0 else t for i, t in enumerate(target)]
    if isinstance(x, Small):
        if len(target) <= 1:
            return Small(x.values, len(target), x.dtype)
        x = tensor(x)
    return torch.reshape(x, target)


@onnx_op("Flatten")
def _flatten(inputs, attrs, opset):
    x = tensor(inputs[0])
    axis = _axis(attrs.get("axis", 1), x.dim())
    lead = 1
    for d in x.shape[:axis]:
        lead = lead * d
    return torch.reshape(x, [lead, -1])


@onnx_op("Transpose")
def _transpose(inputs, attrs, opset):
    x = inputs[0]
    if isinstance(x, Small):
        return x
    perm = attrs.get("perm") or list(range(x.dim() - 1, -1, -1))
    if [_axis(p, x.dim()) for p in perm] == list(range(x.dim())):
        return x  # the importer's attention fusion leaves kᵀ's Transpose as the identity
    return torch.permute(x, perm)


def _axes_of(inputs, attrs, opset, first_input_opset):
    if opset >= first_input_opset:
        return ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None
    return attrs.get("axes")


@onnx_op("Unsqueeze")
def _unsqueeze(inputs, attrs, opset):
    x = inputs[0]
    axes = _axes_of(inputs, attrs, opset, 13)
    out_rank = len(x.shape) + len(axes)
    axes = sorted(_axis(a, out_rank) for a in axes)
    if isinstance(x, Small) and x.rank == 0 and axes == [0]:
        return Small(x.values, 1, x.dtype)
    x = tensor(x)
    for a in axes:
        x = torch.unsqueeze(x, a)
    return x


@onnx_op("Squeeze")
def _squeeze(inputs, attrs, opset):
    x = inputs[0]
    axes = _axes_of(inputs, attrs, opset, 13)
    if isinstance(x, Small):
        if x.rank == 1 and len(x.values) == 1 and (axes is None or [_axis(a, 1) for a in axes] == [0]):
            return Small(x.values, 0, x.dtype)
        return x
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if isinstance(d, int) and d == 1]
    axes = sorted((_axis(a, x.dim()) for a in axes), reverse=True)
    for a in axes:
        x = torch.squeeze(x, a)
    return x


@onnx_op("Expand")
def _expand(inputs, attrs, opset):
    x, shape = inputs
    target = ints(shape)
    dims = list(x.shape)
    rank = max(len(dims), len(target))
    dims = [1] * (rank - len(dims)) + dims
    target = [1] * (rank - len(target)) + target
    # ONNX Expand broadcasts both ways: a target dim of 1 keeps the input's dim; -1 keeps a
    # dim the target repeats (so a symbolic size is not guarded against being 1)
    out = [-1 if (isinstance(t, int) and t == 1) or _same_size(d, t) else t for d, t in zip(dims, target)]
    if isinstance(x, Small) and rank <= 1 and x.is_concrete() and (not out or isinstance(out[-1], int)):
        n = len(x.values) if not out or out[-1] == -1 else out[-1]
        return Small(x.values * (n // len(x.values)), rank, x.dtype)
    x = tensor(x)
    for _ in range(rank - x.dim()):
        x = x.unsqueeze(0)
    return x.expand(out)


def _same_size(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


@onnx_op("Tile")
def _tile(inputs, attrs, opset):
    return tensor(inputs[0]).repeat(ints(inputs[1]))


@onnx_op("ConstantOfShape")
def _constant_of_shape(inputs, attrs, opset):
    shape = ints(inputs[0])
    fill = attrs.get("value")  # a Small (the importer turns tensor attributes into Python values)
    value, dtype = (fill.values[0], fill.dtype) if fill is not None else (0.0, torch.float32)
    if len(shape) <= 1 and all(isinstance(d, int) for d in shape) and (not shape or shape[0] <= SMALL_NUMEL):
        return Small((value,) * (shape[0] if shape else 1), len(shape), dtype)
    return torch.full(shape, value, dtype=dtype)


@onnx_op("Range")
def _range(inputs, attrs, opset):
    start, limit, delta = inputs
    dtype = start.dtype
    if all(isinstance(v, Small) for v in inputs):
        return torch.arange(start.scalar, limit.scalar, delta.scalar, dtype=dtype)
    raise DataDependent("Range bounds computed from tensor data")


@onnx_op("Concat")
def _concat(inputs, attrs, opset):
    parts = [v for v in inputs if not (isinstance(v, Small) and v.rank == 1 and not v.values)]
    if all(isinstance(v, Small) for v in parts):
        return Small(tuple(x for v in parts for x in v.values), 1, parts[0].dtype if parts else torch.int64)
    tensors = [tensor(v) for v in parts]
    return torch.cat(tensors, dim=attrs["axis"])


def split(inputs, attrs, opset, outputs: int):
    """Split into ``outputs`` pieces (sizes from the input (opset >= 13) / attribute, else equal)."""
    x = tensor(inputs[0])
    axis = _axis(attrs.get("axis", 0), x.dim())
    sizes = ints(inputs[1]) if opset >= 13 and len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
    if sizes is None:
        total = x.shape[axis]
        if not isinstance(total, int):
            raise DataDependent("Split of a symbolic axis without sizes")
        chunk = -(-total // outputs)  # opset 18: the last chunk may be smaller
        sizes = [min(chunk, total - i * chunk) for i in range(outputs)]
    return tuple(torch.split(x, list(sizes), dim=axis))


@onnx_op("Slice")
def _slice(inputs, attrs, opset):
    x = inputs[0]
    if opset >= 10:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
        steps = ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    else:
        starts, ends = attrs["starts"], attrs["ends"]
        axes = attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    if isinstance(x, Small) and x.rank == 1:
        (start,), (end,), (step,) = starts, ends, steps
        return Small(tuple(x.values[slice(start, end, step)]), 1, x.dtype)
    x = tensor(x)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if isinstance(step, int) and step < 0:
            raise DataDependent("Slice with a negative step")
        axis = _axis(axis, x.dim())
        if not _whole(start, end, step, x.shape[axis]):
            index[axis] = slice(start, end, step)
    # a traced x[:, :, None] can reach ONNX as Slice(0, INT64_MAX) per axis: no op at all, so the
    # graph reads like a captured one (K/V's GQA repeat stays reshape / expand / unsqueeze)
    return x if all(i == slice(None) for i in index) else x[tuple(index)]


def _whole(start, end, step, size) -> bool:
    """Does ``[start:end:step]`` keep every element of an axis of ``size`` (at every size)?"""
    if not (isinstance(start, int) and start == 0 and isinstance(step, int) and step == 1):
        return False
    return (isinstance(end, int) and end >= 2**31 - 1) or _same_size(end, size)


@onnx_op("Gather")
def _gather(inputs, attrs, opset):
    data, idx = inputs
    axis = attrs.get("axis", 0)
    if isinstance(data, Small) and isinstance(idx, Small) and data.rank == 1:
        n = len(data.values)
        return Small(tuple(data.values[i + n if i < 0 else i] for i in idx.values), idx.rank, data.dtype)
    data = tensor(data)
    axis = _axis(axis, data.dim())
    if isinstance(idx, Small) and idx.rank == 0:
        return torch.select(data, axis, idx.scalar)
    idx = tensor(idx)
    if axis == 0 and data.dim() == 2 and data.is_floating_point():
        return F.embedding(idx, data)  # a lookup table: the op the ModelMap reads embeddings from
    return data[tuple([slice(None)] * axis + [idx])]


@onnx_op("GatherElements")
def _gather_elements(inputs, attrs, opset):
    data, idx = tensor(inputs[0]), tensor(inputs[1])
    axis = _axis(attrs.get("axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


@onnx_op("GatherND")
def _gather_nd(inputs, attrs, opset):
    data, idx = tensor(inputs[0]), tensor(inputs[1])
    batch_dims = attrs.get("batch_dims", 0)
    depth = idx.shape[-1]
    if not isinstance(depth, int):
        raise DataDependent("GatherND with a symbolic index depth")
    index = []
    for b in range(batch_dims):  # batch axes index themselves
        shape = [1] * (idx.dim() - 1)
        shape[b] = data.shape[b]
        index.append(torch.arange(data.shape[b]).reshape(shape))
    index += [idx[..., i] for i in range(depth)]
    return data[tuple(index)]


@onnx_op("ScatterND")
def _scatter_nd(inputs, attrs, opset):
    data, idx, updates = (tensor(v) for v in inputs)
    if attrs.get("reduction", "none") != "none":
        raise DataDependent("ScatterND with a reduction")
    depth = idx.shape[-1]
    return torch.index_put(data, tuple(idx[..., i] for i in range(depth)), updates)


@onnx_op("Trilu")
def _trilu(inputs, attrs, opset):
    x = tensor(inputs[0])
    k = _py_scalar(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else 0
    return torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)


@onnx_op("CumSum")
def _cumsum(inputs, attrs, opset):
    x = tensor(inputs[0])
    axis = _axis(int(_py_scalar(inputs[1])), x.dim())
    if attrs.get("reverse", 0):
        x = torch.flip(x, [axis])
    out = torch.cumsum(x, axis)
    if attrs.get("exclusive", 0):
        out = out - x
    return torch.flip(out, [axis]) if attrs.get("reverse", 0) else out


# -- reductions -------------------------------------------------------------------------------------
def _reduce(torch_fn, axes_input_opset: int):
    def translate(inputs, attrs, opset):
        x = tensor(inputs[0])
        axes = _axes_of(inputs, attrs, opset, axes_input_opset)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return torch_fn(x, list(axes), keep)

    return translate


def _reduce_prod(x, axes, keep):
    for a in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = torch.prod(x, a, keepdim=keep)
    return x


TRANSLATIONS["ReduceMean"] = _reduce(lambda x, axes, keep: torch.mean(x, axes, keepdim=keep), 18)
TRANSLATIONS["ReduceSum"] = _reduce(lambda x, axes, keep: torch.sum(x, axes, keepdim=keep), 13)
TRANSLATIONS["ReduceMax"] = _reduce(lambda x, axes, keep: torch.amax(x, axes, keepdim=keep), 18)
TRANSLATIONS["ReduceMin"] = _reduce(lambda x, axes, keep: torch.amin(x, axes, keepdim=keep), 18)
TRANSLATIONS["ReduceProd"] = _reduce(_reduce_prod, 18)
TRANSLATIONS["ReduceL2"] = _reduce(lambda x, axes, keep: torch.linalg.vector_norm(x, 2, axes, keepdim=keep), 18)


def _arg(fn):
    def translate(inputs, attrs, opset):
        x = tensor(inputs[0])
        if attrs.get("select_last_index", 0):
            raise DataDependent("ArgMax/ArgMin with select_last_index")
        return fn(x, attrs.get("axis", 0), keepdim=bool(attrs.get("keepdims", 1)))

    return translate


TRANSLATIONS["ArgMax"] = _arg(torch.argmax)
TRANSLATIONS["ArgMin"] = _arg(torch.argmin)


# -- linear algebra and norms -----------------------------------------------------------------------
@onnx_op("MatMul")
def _matmul(inputs, attrs, opset):
    return torch.matmul(tensor(inputs[0]), tensor(inputs[1]))


@onnx_op("Linear")
def _linear(inputs, attrs, opset):
    """MatMul by a weight initializer (+ its bias Add), or Gemm with transB: the importer
    stores the weight as ``[out, in]`` so the graph holds ``aten.linear`` like a captured model."""
    x, weight = tensor(inputs[0]), inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    return F.linear(x, weight, None if bias is None else tensor(bias))


@onnx_op("Gemm")
def _gemm(inputs, attrs, opset):
    a, b = tensor(inputs[0]), tensor(inputs[1])
    c = tensor(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    out = torch.matmul(a, b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out


@onnx_op("Conv")
def _conv(inputs, attrs, opset):
    """N-d convolution (ViT's patch embedding, audio front ends): ``x [B, C, *S]``, ``w [M, C/group, *K]``.

    ``pads`` are ONNX's ``[x1_begin, x2_begin, …, x1_end, x2_end, …]``; symmetric pads go to
    the convolution, asymmetric ones to an explicit ``F.pad`` first. ``auto_pad`` other than
    ``NOTSET`` / ``VALID`` (the SAME_* forms) is refused by name: exporters of the families
    tokenfx maps write explicit pads."""
    x, weight = tensor(inputs[0]), tensor(inputs[1])
    bias = tensor(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
    dims = weight.dim() - 2
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"Conv with auto_pad={auto_pad} (only explicit pads are translated)")
    pads = [0] * (2 * dims) if auto_pad == "VALID" else list(attrs.get("pads", [0] * (2 * dims)))
    begin, end = pads[:dims], pads[dims:]
    if begin != end:
        # F.pad lists the last dim first: (last_begin, last_end, …, first_begin, first_end)
        x = F.pad(x, [p for d in reversed(range(dims)) for p in (begin[d], end[d])])
        begin = [0] * dims
    strides = list(attrs.get("strides", [1] * dims))
    dilations = list(attrs.get("dilations", [1] * dims))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(dims)
    if conv is None:
        raise NotImplementedError(f"Conv over {dims} spatial dims")
    return conv(x, weight, bias, stride=strides, padding=begin, dilation=dilations, groups=attrs.get("group", 1))


@onnx_op("FusedAttention")  # not an ONNX op (opset 23's Attention differs): the importer's fusion
def _attention(inputs, attrs, opset):
    """The exporters' SDPA decomposition re-formed by the importer (not an ONNX op)::

        p = softmax((q·c₁) @ (kᵀ·c₂) · c₃ + mask) ;  out = p @ v
          = scaled_dot_product_attention(q, k, v, mask, scale=c₁c₂c₃)

    ``q [B, H, N, D]``, ``k`` as given (``attrs["k_transposed"]``: the exporter's ``kᵀ [B, H, D, S]``),
    ``v [B, H, S, Dv]``, ``mask`` additive, broadcastable to ``[B, H, N, S]`` (or absent).
    Exact up to fp32 rounding: SDPA scales q and k by √scale as the exporters' decomposition
    does. A row whose every score is -inf gives 0 (SDPA / ``_safe_softmax``) where a plain
    ``Softmax`` gave NaN. Inputs that are not 4-d run the original ops instead. Inputs 4 and 5
    (the dynamo exporter's kᵀ = reshape(transpose(reshape(k)))): ``k`` and its 3-d flattening;
    attention reads ``k`` when :func:`_flattened_kt` confirms the shapes."""
    q, k, v = (tensor(x) for x in inputs[:3])
    mask = tensor(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    if attrs["k_transposed"] and len(inputs) > 5 and _flattened_kt(k, tensor(inputs[4]), tensor(inputs[5])):
        k = tensor(inputs[4])  # kᵀ was k flattened, transposed and reshaped back: k itself
    elif attrs["k_transposed"]:
        k = k.transpose(-1, -2)
    axis = attrs.get("axis", -1)
    fits = q.dim() == k.dim() == v.dim() == 4 and _axis(axis, 4) == 3 and (mask is None or mask.dim() <= 4)
    if fits and (mask is None or mask.dtype == q.dtype):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attrs["scale"])
    scores = torch.matmul(q, k.transpose(-1, -2)) * attrs["scale"]
    scores = scores if mask is None else scores + mask
    p = torch.ops.aten._safe_softmax(scores, axis) if attrs.get("safe") else torch.softmax(scores, axis)
    return torch.matmul(p, v)


def _flattened_kt(kt, k, flat) -> bool:
    """Is ``kt [*lead, D, S]`` the transpose of ``k [*lead, S, D]`` through ``flat [X, S, D]``
    (a reshape that merged only the leading dims, then ``Transpose([0, 2, 1])``, then a reshape
    back to ``k``'s leading dims)?"""
    if not (k.dim() == kt.dim() >= 3 and flat.dim() == 3):
        return False
    same = [(flat.shape[1], k.shape[-2]), (flat.shape[2], k.shape[-1]), (kt.shape[-1], k.shape[-2]),
            (kt.shape[-2], k.shape[-1])] + list(zip(kt.shape[:-2], k.shape[:-2]))
    return all(_same_size(a, b) for a, b in same)


@onnx_op("Einsum")
def _einsum(inputs, attrs, opset):
    return torch.einsum(attrs["equation"], *(tensor(v) for v in inputs))


@onnx_op("LayerNormalization")
def _layer_norm(inputs, attrs, opset):
    x = tensor(inputs[0])
    weight = tensor(inputs[1])
    bias = tensor(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
    axis = _axis(attrs.get("axis", -1), x.dim())
    return F.layer_norm(x, list(x.shape[axis:]), weight, bias, attrs.get("epsilon", 1e-5))


@onnx_op("SimplifiedLayerNormalization", "RMSNormalization")
def _rms_norm(inputs, attrs, opset):
    x, weight = tensor(inputs[0]), tensor(inputs[1])
    axis = _axis(attrs.get("axis", -1), x.dim())
    return F.rms_norm(x, list(x.shape[axis:]), weight, attrs.get("epsilon", 1e-5))


@onnx_op("Dropout")
def _dropout(inputs, attrs, opset):
    return inputs[0]  # inference: an identity (a mask output is refused by the importer)


def translation(op_type: str) -> Callable[..., Any] | None:
    if op_type == "Split":
        return split
    return TRANSLATIONS.get(op_type)


INTERNAL = frozenset({"Linear", "SafeSoftmax", "FusedAttention"})  # patterns the importer fuses, not ONNX ops
SUPPORTED = sorted(set(TRANSLATIONS) - INTERNAL)
