"""The token-reduction ops exported to ONNX through their onnxscript translations: standard
ops only, dynamic batch / token dims, onnxruntime output equal to the torch reference at two
shapes that differ from the export example (integers exactly, floats within 1e-5)."""

from __future__ import annotations

import torch

from tokenfx.codegen import token_reduce  # registers torch.ops.tokenfx.{bipartite_match, ...}

import onnx  # dev dependencies: a missing one must fail the suite, not skip it
import onnxruntime as ort
from tokenfx.codegen import onnx_token_reduce as tr  # noqa: E402

C, H = 8, 2
STANDARD_DOMAINS = {"", "ai.onnx"}
EXAMPLE = (4, 7)  # (B, N) of the export example
SHAPES = [(3, 11), (2, 16)]  # (B, N) run in onnxruntime
LENGTHS = {(4, 7): [7, 4, 2, 1], (3, 11): [11, 5, 2], (2, 16): [16, 1]}  # real tokens per row: pads, no B, none


def _real(B, N):
    return torch.arange(N) < torch.tensor(LENGTHS[(B, N)])[:, None]


def _roles(real):
    """Roles as the merge passes make them: position 0 protected, the rest alternate A, B."""
    part = real.clone()
    part[:, 0] = False
    return torch.where(part, 1 + (part.long().cumsum(-1) - 1) % 2, 0)


def _participates(real):
    part = real.clone()
    part[:, 0] = False
    return part


def _export(module, example, dynamic_shapes, op_names):
    names = (op_names,) if isinstance(op_names, str) else op_names
    table = {getattr(torch.ops.tokenfx, name).default: getattr(tr, name) for name in names}
    program = torch.onnx.export(module.eval(), example, dynamo=True, dynamic_shapes=dynamic_shapes,
                                custom_translation_table=table, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    assert not proto.functions, "the translation must inline to standard ops, not local functions"
    domains = {node.domain for node in proto.graph.node}
    assert domains <= STANDARD_DOMAINS, f"non-standard ONNX domains: {domains - STANDARD_DOMAINS}"
    for graph_input in proto.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert dims[0].dim_param and any(d.dim_param for d in dims[1:]), "batch and token dims must stay symbolic"
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, *inputs):
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def _check(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        if w.is_floating_point():
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(g, w), (g, w)


def _dyn(*names_and_axes):
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    dims = {"b": batch, "n": tokens}
    return {name: {i: dims[a] for i, a in enumerate(axes) if a in dims} for name, axes in names_and_axes}


# -- modules ------------------------------------------------------------------------------------------
class Step(torch.nn.Module):
    """match → plan → merge as a merge pass chains them (r = 2)."""

    def forward(self, x, size, role, real):
        score, match = torch.ops.tokenfx.bipartite_match(x, role)
        assign, keep = torch.ops.tokenfx.reduction_plan(score, match, role, real, 2, True)
        x2, size2 = torch.ops.tokenfx.merge_tokens(x, size, assign, 2)
        return score, match, assign, keep, x2, size2


class Plan(torch.nn.Module):
    """One graph for several ``(r, merge)`` plans: one export instead of one per case."""

    def __init__(self, configs):
        super().__init__()
        self.configs = configs

    def forward(self, score, match, role, real):
        return tuple(out for r, merge in self.configs
                     for out in torch.ops.tokenfx.reduction_plan(score, match, role, real, r, merge))


class Merge(torch.nn.Module):
    """r = 0 and r = 2 in fp32, r = 2 in fp16."""

    def forward(self, x, x16, size, assign0, assign2):
        merge = torch.ops.tokenfx.merge_tokens
        return (*merge(x, size, assign0, 0), *merge(x, size, assign2, 2), *merge(x16, size, assign2, 2))


class PageRank(torch.nn.Module):
    def __init__(self, configs):
        super().__init__()
        self.configs = configs

    def forward(self, probs, real):
        return tuple(torch.ops.tokenfx.attention_pagerank(probs, real, it, cls) for it, cls in self.configs)


class Roles(torch.nn.Module):
    def forward(self, importance, participates):
        return torch.ops.tokenfx.importance_roles(importance, participates)


# -- inputs -------------------------------------------------------------------------------------------
def _metric(B, N, seed):
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed))


def _plan_inputs(B, N, seed, ties):
    """score / match as bipartite_match makes them; with ``ties`` scores on a coarse grid (exact ties)."""
    real = _real(B, N)
    role = _roles(real)
    if not ties:
        score, match = token_reduce.bipartite_match_reference(_metric(B, N, seed), role)
        return score, match, role, real
    g = torch.Generator().manual_seed(seed)
    own = torch.arange(N).expand(B, N)
    has_b = (role == 2).any(-1, keepdim=True)
    a = (role == 1) & has_b
    score = torch.where(a, torch.randint(-4, 5, (B, N), generator=g) / 4.0, float("-inf"))
    b_idx = torch.where(role == 2, torch.rand(B, N, generator=g), -1.0).argmax(-1, keepdim=True)
    match = torch.where(a, b_idx.expand(B, N), own)
    return score, match, role, real


def _probs(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    real = _real(B, N)
    logits = torch.randn(B, H, N, N, generator=g).masked_fill(~real[:, None, None, :], float("-inf"))
    return logits.softmax(-1), real


def _assert_no_near_ties(metric, role):
    """The best and second-best B partner of every A token differ by far more than rounding."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    s = (m @ m.transpose(-1, -2)).masked_fill(~((role == 1)[..., None] & (role == 2)[:, None, :]), float("-inf"))
    top = s.topk(2, dim=-1).values
    gap = (top[..., 0] - top[..., 1])[(role == 1) & ((role == 2).sum(-1, keepdim=True) >= 2)]
    assert (gap > 1e-4).all()


# -- tests --------------------------------------------------------------------------------------------
def test_bipartite_match_in_a_reduction_step():
    """bipartite_match's outputs, and what plan and merge make of them, in one exported graph."""

    def inputs(B, N):
        real = _real(B, N)
        return _metric(B, N, N), torch.ones(B, N), _roles(real), real

    session = _export(Step(), inputs(*EXAMPLE), _dyn(("x", "bn"), ("size", "bn"), ("role", "bn"), ("real", "bn")),
                      ("bipartite_match", "reduction_plan", "merge_tokens"))
    for B, N in SHAPES:
        args = inputs(B, N)
        _assert_no_near_ties(args[0], args[2])
        want = Step()(*args)
        score = want[0]
        assert (score[:, 0] == float("-inf")).all() and (score[-1] == float("-inf")).all()  # protected; no B
        _check(_run(session, *args), want)


PLANS = [(0, True), (2, True), (2, False), (4, True)]  # (r, merge)


def test_reduction_plan():
    B, N = EXAMPLE
    session = _export(Plan(PLANS), _plan_inputs(B, N, 0, False),
                      _dyn(("score", "bn"), ("match", "bn"), ("role", "bn"), ("real", "bn")), "reduction_plan")
    for B, N in SHAPES:
        for ties in (False, True):  # bipartite_match's scores; a coarse grid of exact ties
            inputs = _plan_inputs(B, N, N, ties)
            if not ties:
                _assert_no_near_ties(_metric(B, N, N), inputs[2])
            want = [out for r, merge in PLANS for out in torch.ops.tokenfx.reduction_plan(*inputs, r, merge)]
            _check(_run(session, *inputs), want)


def test_merge_tokens():
    def inputs(B, N):
        g = torch.Generator().manual_seed(N)
        x = torch.randn(B, N, C, generator=g)
        size = torch.randint(1, 5, (B, N), generator=g).float()
        plan = _plan_inputs(B, N, N, False)
        assign0, _ = token_reduce.reduction_plan_reference(*plan, 0, True)
        assign2, _ = token_reduce.reduction_plan_reference(*plan, 2, True)
        return x, x.half(), size, assign0, assign2

    session = _export(Merge(), inputs(*EXAMPLE),
                      _dyn(("x", "bn"), ("x16", "bn"), ("size", "bn"), ("assign0", "bn"), ("assign2", "bn")),
                      "merge_tokens")
    for B, N in SHAPES:
        args = inputs(B, N)
        assign2 = args[-1]  # some tokens dropped, some slots receiving two tokens
        assert (assign2 == N - 2).any() and ((assign2[..., None] == torch.arange(N - 2)).sum(1) > 1).any()
        got, want = _run(session, *args), Merge()(*args)
        _check(got[:4], want[:4])
        # fp16: the same fp32 average rounded once, so at most an fp16 ulp apart; size' is fp32
        torch.testing.assert_close(got[4], want[4], atol=2e-3, rtol=2e-3)
        _check(got[5:], want[5:])


PAGERANKS = [(0, True), (3, False), (3, True)]  # (iterations, cls_weight)


def test_attention_pagerank():
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    dynamic = {"probs": {0: batch, 2: tokens, 3: tokens}, "real": {0: batch, 1: tokens}}
    session = _export(PageRank(PAGERANKS), _probs(*EXAMPLE, 0), dynamic, "attention_pagerank")
    for B, N in SHAPES:
        probs, real = _probs(B, N, N)
        _check(_run(session, probs, real), list(PageRank(PAGERANKS)(probs, real)))


def test_importance_roles():
    def inputs(B, N, ties):
        g = torch.Generator().manual_seed(N)
        imp = torch.randint(0, 4, (B, N), generator=g).float() if ties else torch.rand(B, N, generator=g)
        return imp, _participates(_real(B, N))

    session = _export(Roles(), inputs(*EXAMPLE, False), _dyn(("importance", "bn"), ("participates", "bn")),
                      "importance_roles")
    for B, N in SHAPES:
        for ties in (False, True):
            imp, part = inputs(B, N, ties)
            want = torch.ops.tokenfx.importance_roles(imp, part)
            _check(_run(session, imp, part), [want])
