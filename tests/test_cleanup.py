import torch

import kunlun_compile as kc

aten = torch.ops.aten


def _compile(fn, *args):
    be = kc.backend(strict=True, disable=["lower_elementwise"])  # these tests look at the ATen ops
    out = torch.compile(fn, backend=be)(*args)
    return out, be.report.graphs[0]


def _final_code(graph_report):
    """The graph code after the last pass that ran."""
    return [p for p in graph_report.passes if not p.skipped][-1].code_after


def test_noop_views_and_casts_are_removed():
    def f(x):
        y = x.view(x.shape).reshape(x.shape) + 1
        y = y.to(torch.float32)[:, :]  # same dtype, full slice
        return y.permute(0, 1) * 2

    x = torch.randn(4, 8)
    out, g = _compile(f, x)
    torch.testing.assert_close(out, (x + 1) * 2)
    code = _final_code(g)
    assert "aten.view" not in code and "aten.slice" not in code and "permute" not in code
    assert "aten.add" in code and "aten.mul" in code


def test_real_views_survive():
    def f(x):
        return (x.view(2, 16) + 1)[:, 4:].reshape(-1)

    x = torch.randn(4, 8)
    out, g = _compile(f, x)
    torch.testing.assert_close(out, ((x.view(2, 16) + 1)[:, 4:]).reshape(-1))
    assert "aten.slice" in _final_code(g)


def test_returned_copy_is_not_removed():
    # Dropping the clone would make the output alias the input.
    def f(x):
        return x.clone(), (x * 2).clone()

    x = torch.randn(4, 8)
    (a, b), _ = _compile(f, x)
    assert a.data_ptr() != x.data_ptr()
    torch.testing.assert_close(b, x * 2)
    a.add_(1)
    assert not torch.equal(a, x)


def test_dead_code_removed():
    def f(x):
        unused = torch.exp(x) * 3  # noqa: F841 - the dead code the pass must remove
        return x + 1

    x = torch.randn(3)
    out, g = _compile(f, x)
    torch.testing.assert_close(out, x + 1)
    assert "exp" not in g.passes[-1].code_after


def test_fresh_copies_of_constants_are_dropped():
    def f(x):
        return x * torch.tensor([2.0, 3.0])  # Dynamo lifts the constant: lift_fresh_copy every call

    x = torch.randn(4, 2)
    out, g = _compile(f, x)
    torch.testing.assert_close(out, f(x))
    assert "lift_fresh_copy" in g.passes[0].code_before and "lift_fresh_copy" not in _final_code(g)


def test_equal_transposes_of_one_view_are_merged():
    """Functionalization replays a mutated buffer's views at every use (vLLM's transformers backend: view ->
    transpose -> slice per use of q): equal transposes and permutes become one node, so a pattern that reads q
    twice sees one q.  Unequal ones (other dims) stay."""
    from kunlun_compile.passes.cleanup import merge_duplicates
    from kunlun_compile.passes.pattern_engine import trace_aten

    def fn(x):
        a, b = x.transpose(1, 2), x.transpose(1, 2)
        c, d = x.permute(2, 0, 1), x.permute(2, 0, 1)
        return a * b, c + d, x.transpose(0, 1) - 1

    gm = trace_aten(fn, (torch.randn(2, 3, 4),))  # traced graphs are canonicalised, merge included
    assert merge_duplicates(gm) == 0  # nothing left to merge
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(1 for t in ops if t is torch.ops.aten.transpose.int) == 2  # a = b, and the other dims' own
    assert sum(1 for t in ops if t is torch.ops.aten.permute.default) == 1
    add = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor)
    assert add.args[0] is add.args[1]
    # a * a, once its two reads are one node, is the canonical a.pow(2) (algebra.py), on the merged transpose
    square = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.pow.Tensor_Scalar)
    assert square.args[0].target is torch.ops.aten.transpose.int and square.args[1] == 2


def test_an_in_place_update_of_a_squeezed_view_leaves_no_unsqueeze_squeeze_pair():
    """`bmm(...).squeeze(1).add_(b)` functionalizes to add, then `unsqueeze(add, 1).squeeze(1)` for every later
    read of the updated view: canonical form reads the add itself (transformers' batched_mm experts do this)."""
    def f(a, w, b):
        out = torch.bmm(a.unsqueeze(1), w).squeeze(1)
        out.add_(b)
        return out[..., ::2] * out[..., 1::2]

    a, w, b = torch.randn(6, 8), torch.randn(6, 8, 4), torch.randn(6, 4)
    out, g = _compile(f, a, w, b)
    want = torch.bmm(a.unsqueeze(1), w).squeeze(1) + b
    torch.testing.assert_close(out, want[..., ::2] * want[..., 1::2])
    code = _final_code(g)
    assert code.count("aten.squeeze") == 1 and code.count("aten.unsqueeze") == 1, code  # the bmm's own pair


def test_squeeze_of_an_unsqueeze_at_another_dim_stays():
    def f(x):
        return x.unsqueeze(0).squeeze(1) + 1  # [4, 1] -> [1, 4, 1] -> squeeze(1) drops nothing: size 4

    x = torch.randn(4, 1)
    out, g = _compile(f, x)
    torch.testing.assert_close(out, x.unsqueeze(0).squeeze(1) + 1)
    assert out.shape == (1, 4, 1)
