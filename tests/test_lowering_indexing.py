"""Indexing inside generated kernels: views of computed values, cat, gathers, arange (lowering/reindex.py).

Each case is lowered and run through the KIR interpreter and through the generated Triton kernel under
Triton's interpreter, on fresh random inputs; both must equal eager exactly (indexing moves values, and
the element-wise steps around it are eager's op by op).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import kunlun_compile as kc
from kunlun_compile.graph_stats import count_kernels, generated_kernels
from kunlun_compile.lowering.cache import kir_for
from kunlun_compile.lowering.index_expr import Affine, identity
from kunlun_compile.ops import cpu_kernels

from .test_lowering_reductions import lower

F = torch.nn.functional


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_neox(q, cos, sin):
    return q * cos + rotate_half(q) * sin


def rope_of_computed(q, cos, sin):  # the rotation of a value the kernel computes (a norm's output, scaled)
    qn = q * 1.5 - 0.25
    return qn * cos + rotate_half(qn) * sin


def rope_partial(q, cos, sin):
    rot, rest = q[..., :cos.shape[-1]], q[..., cos.shape[-1]:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def rope_chunk(q, cos, sin):  # chunk instead of slicing
    x1, x2 = (q * 1.0).chunk(2, dim=-1)
    return q * cos + torch.cat((-x2, x1), -1) * sin


def embedding_scaled(ids, table):
    return F.embedding(ids, table) * 8.0


def index_select_add(ids, table):
    return table.index_select(0, ids) + 1.0


def causal_mask(q_pos, k_pos):
    k = torch.arange(k_pos.shape[0], device=k_pos.device)
    return torch.where(k[None, :] <= q_pos[:, None], 0.0, float("-inf"))


def transpose_of_computed(x, y):
    return torch.sigmoid(x).t() * y


def reshape_of_computed(x, y):  # [T, H] -> [T, heads, hd] of a computed value, times a per-head scale
    return (x * 2.0).view(x.shape[0], 4, -1) * y[:, None]


def cat_of_computed(x, y):
    return torch.cat((torch.relu(x), y * 3.0, -x), dim=0) + 1.0


def expand_of_computed(x, y):
    return (x + 1.0)[:, None, :].expand(-1, 3, -1) * y


def gather_ids(x, ids):
    return torch.gather(x, 1, ids) * 2.0


def rope_interleaved(q, cos, sin):  # GPT-J / GLM pairs: stack(-odd, even) flattened back
    rotated = torch.stack((-q[..., 1::2], q[..., ::2]), dim=-1).flatten(-2)
    return q * cos + rotated * sin


def index_tensor(x, ids):
    return x[ids] * 2.0


def index_pairs(x, ids):  # x[rows, ids]: two index tensors broadcast together (HF's packed-sequence mask)
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, ids] * 2.0


def index_pairs_of_computed(x, ids):  # the same pick from a value the kernel computes, ids counted from the end
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return (x + 1.0)[rows, ids - x.shape[1]] * 2.0


def expert_slots(ids, width):  # integer index arithmetic of MoE dispatch: // and % with torch's signs
    return (ids // 3) * 10 + ids % 3 + width


CASES = [
    (rope_neox, lambda: (torch.randn(5, 4, 32), torch.randn(5, 1, 32), torch.randn(5, 1, 32))),
    (rope_of_computed, lambda: (torch.randn(5, 4, 32), torch.randn(5, 1, 32), torch.randn(5, 1, 32))),
    (rope_partial, lambda: (torch.randn(5, 4, 48), torch.randn(5, 1, 16), torch.randn(5, 1, 16))),
    (rope_chunk, lambda: (torch.randn(3, 2, 16), torch.randn(3, 1, 16), torch.randn(3, 1, 16))),
    (embedding_scaled, lambda: (torch.randint(0, 50, (7,)), torch.randn(50, 16))),
    (index_select_add, lambda: (torch.randint(0, 50, (7,)), torch.randn(50, 16))),
    (causal_mask, lambda: (torch.arange(3, 8), torch.arange(10))),
    (transpose_of_computed, lambda: (torch.randn(6, 9), torch.randn(9, 6))),
    (reshape_of_computed, lambda: (torch.randn(6, 32), torch.randn(6, 4, 1))),
    (cat_of_computed, lambda: (torch.randn(3, 8), torch.randn(2, 8))),
    (expand_of_computed, lambda: (torch.randn(4, 8), torch.randn(4, 3, 8))),
    (gather_ids, lambda: (torch.randn(4, 9), torch.randint(0, 9, (4, 5)))),
    (rope_interleaved, lambda: (torch.randn(5, 4, 32), torch.randn(5, 1, 32), torch.randn(5, 1, 32))),
    (index_tensor, lambda: (torch.randn(12, 8), torch.randint(0, 12, (3, 5)))),
    (index_tensor, lambda: (torch.randn(12, 8), torch.randint(-12, 12, (3, 5)))),  # negative: from the end
    (index_pairs, lambda: (torch.randn(4, 9), torch.randint(-9, 9, (4, 5)))),
    (index_pairs_of_computed, lambda: (torch.randn(4, 9), torch.randint(0, 9, (4, 5)))),
    (expert_slots, lambda: (torch.randint(-20, 20, (6, 4)), torch.randint(0, 5, (4,)))),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fn,make", CASES, ids=[c[0].__name__ for c in CASES])
def test_indexing_is_inside_one_kernel_and_exact(fn, make, dtype):
    torch.manual_seed(CASES.index((fn, make)))
    args = [a.to(dtype) if a.is_floating_point() else a for a in make()]
    gm, outcome = lower(fn, *args)
    kernels = count_kernels(gm)
    assert kernels["aten"] == 0 and kernels["pointwise"] == 1, (kernels, outcome.near_misses)
    want = fn(*args)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            got = gm(*args)
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        if interpreted and dtype == torch.float32:  # Triton's interpreter: numpy's exp, not torch's (1 unit)
            torch.testing.assert_close(got, want, rtol=2.5e-7, atol=1e-30)
        else:
            assert torch.equal(got, want), (interpreted, (got.double() - want.double()).abs().max())


def test_the_listing_shows_index_expressions_and_guards():
    gm, _ = lower(rope_neox, torch.randn(5, 4, 32), torch.randn(5, 1, 32), torch.randn(5, 1, 32))
    text = kir_for(generated_kernels(gm)[0]).listing()
    assert "[c0, c1, c2] if 0 <= c2 < 16" in text and "[c0, c1, c2 + -16] if 16 <= c2 " in text and "iota c2" in text
    gm, _ = lower(embedding_scaled, torch.randint(0, 50, (7,)), torch.randn(50, 16))
    assert "(gather: NaN outside)" in kir_for(generated_kernels(gm)[0]).listing()


def test_an_id_outside_the_table_raises_as_in_eager_and_the_kernel_reads_nan_not_memory():
    from kunlun_compile.lowering.cache import kernel_for
    from kunlun_compile.lowering.interpret import run_kir

    table, ids = torch.randn(10, 4), torch.tensor([0, 9, 10, -1, 3])
    gm, _ = lower(embedding_scaled, torch.randint(0, 10, (5,)), table)
    with pytest.raises(IndexError):  # the op checks ids it reads from an input on the host, as eager raises
        gm(ids, table)
    (key,) = generated_kernels(gm)
    call = next(n for n in gm.graph.nodes if n.op == "call_function" and "pointwise" in str(n.target))
    inputs = [{"ids_1": ids, "table_1": table}[a.name] for a in call.args[0]]
    for got in (run_kir(kir_for(key), inputs, [5, 4])[0], kernel_for(key)(inputs, [5, 4])[0]):
        assert got[[0, 1, 4]].isfinite().all() and got[[2, 3]].isnan().all()  # the kernel itself never reads
        torch.testing.assert_close(got[[0, 1, 4]], table[[0, 9, 3]] * 8.0)  # outside the table


def test_x_of_ids_counts_negative_ids_from_the_end_and_raises_past_it():
    """x[ids] (aten.index) takes -1 as the last row, as eager does; an id below -size or at size and above
    raises IndexError on the host before the launch, as eager's does."""
    x = torch.randn(12, 8)
    gm, _ = lower(index_tensor, x, torch.randint(0, 12, (3, 5)))
    ids = torch.tensor([[-1, -12, 0, 11, 5]]).expand(3, 5).contiguous()
    torch.testing.assert_close(gm(x, ids), index_tensor(x, ids), rtol=0, atol=0)
    for bad in (-13, 12):
        bad_ids = ids.clone()
        bad_ids[1, 2] = bad
        _both_raise_index_error(index_tensor, gm, x, bad_ids)


def _both_raise_index_error(eager, lowered, *args):
    for fn in (eager, lowered):
        with pytest.raises(IndexError):
            fn(*args)


def test_a_cat_onto_an_empty_or_symbolic_tail_is_one_copy_kernel():
    """HF's KV cache with nothing in it: cat(empty past, new keys) along the symbolic token dim."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from kunlun_compile.config import CompileConfig
    from kunlun_compile.passes import PassContext
    from kunlun_compile.passes.lower_elementwise import lower_elementwise

    def f(past, new):
        return torch.cat((past, new * 1.0), dim=1), torch.cat((new[:, :1], new + 1.0), dim=1)

    past, new = torch.zeros(2, 0, 8), torch.randn(2, 5, 8)
    gm = make_fx(f, tracing_mode="symbolic")(past, new)
    outcome = lower_elementwise(gm, PassContext(CompileConfig(), "t"))
    gm.recompile()
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    for x in (new, torch.randn(2, 3, 8)):
        for got, want in zip(gm(past, x), f(past, x)):
            assert torch.equal(got, want)


def test_views_of_tensors_in_memory_stay_views():
    """A slice of an input is read through its strides (no indexed load, no extra kernel); views alone
    are no kernel at all."""
    def f(x):
        return x[:, :8] * 2.0, x.t()

    gm, _ = lower(f, torch.randn(6, 16))
    assert count_kernels(gm)["pointwise"] == 1
    assert not kir_for(generated_kernels(gm)[0]).indexed


def test_reshape_maps_simplify_to_plain_coordinates():
    c0, c1, c2 = identity(3)
    sizes = [None, 4, 32]
    flat = c0 * 128 + c1 * 32 + c2  # [T, 4, 32] -> [T, 128]
    assert flat.floordiv(128, sizes).code() == "c0"
    assert flat.mod(128, sizes).floordiv(32, sizes).code() == "c1"
    assert flat.mod(32, sizes).code() == "c2"
    assert Affine.from_json(flat.to_json()) == flat
    with pytest.raises(ValueError):
        Affine.from_json([0, [[["__import__", 0], 1]]])  # a cache entry cannot name anything else


def test_fills_of_a_shape_join_the_kernel_that_reads_them():
    """new_ones / zeros / new_full (HF mask construction) have a shape and no values to read: constants of
    the kernel that uses them."""
    def f(x):
        return torch.where(x > 0, x.new_ones(x.shape) * 2.0, torch.zeros(x.shape) + x.new_full(x.shape, 0.5))

    x = torch.randn(4, 6)
    gm, outcome = lower(f, x)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    assert torch.equal(gm(x), f(x))


def test_a_mask_built_from_arange_alone_is_a_kernel():
    """HF's sliding-window mask reads no tensor: arange, compares, where.  The kernel takes a graph input only
    for its device (never loaded)."""
    def sliding(x):
        q, k = torch.arange(7)[:, None], torch.arange(7)[None, :]
        mask = torch.where((k <= q) & (k > q - 4), 0.0, float("-inf"))
        return mask.expand(x.shape[0], 1, 7, 7), x * 2.0

    x = torch.randn(2, 3)
    gm, outcome = lower(sliding, x)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 2, "aten": 0}, outcome.near_misses
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            for got, want in zip(gm(x), sliding(x)):
                assert torch.equal(got, want)


def group_mask(scores, ids):  # DeepSeek's group-limited routing: ones where a chosen group is, then a where
    mask = torch.zeros_like(scores).scatter(1, ids, 1)  # the model's scatter_, as the backend's graph has it
    return torch.where(mask.bool(), scores, 0.0)


def test_a_scatter_of_a_value_is_a_select_in_one_kernel():
    scores, ids = torch.randn(5, 8), torch.topk(torch.randn(5, 8), 3, dim=-1)[1]
    gm, outcome = lower(group_mask, scores, ids)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert torch.equal(gm(scores, ids), group_mask(scores, ids))
    with pytest.raises(IndexError):  # an id past the row: eager raises, so does the op (host check)
        gm(scores, torch.tensor([[0, 1, 8]] * 5))


def test_the_runtime_sees_generated_kernels_that_mix_tokens():
    """Padding a batch is only safe for token-wise pieces: a generated kernel that reads another token's row
    (a cat or gather along the token dim, a reduction over it) must say so, an element-wise one must not."""
    import sympy
    from torch.fx.experimental.proxy_tensor import make_fx

    from kunlun_compile.config import CompileConfig
    from kunlun_compile.passes import PassContext
    from kunlun_compile.passes.lower_elementwise import lower_elementwise
    from kunlun_compile.runtime.token_dims import token_symbol, why_not_token_wise

    def check(fn, *xs):
        gm = make_fx(fn, tracing_mode="symbolic")(*xs)
        lower_elementwise(gm, PassContext(CompileConfig(), "t"))
        gm.recompile()
        placeholders = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        sym = token_symbol(placeholders)
        assert isinstance(sym, sympy.Symbol)
        return why_not_token_wise(gm, sym)

    x = torch.randn(6, 8)
    # per token (a reduction along the hidden dim, a transpose and back): padding is safe
    assert check(lambda t: torch.sigmoid(t) * 2.0 + t.sum(-1, keepdim=True), x) is None
    assert check(lambda t: (t.t() * 2.0).t() + 1.0, x) is None
    assert "token dim" in check(lambda t: torch.softmax(t, 0), x)  # a reduction over tokens
    assert "reads token dim" in check(lambda t, ids: t[ids] * 2.0, x, torch.tensor([5, 0, 1]))  # a gather of rows
    assert "token dim" in check(lambda t: torch.cumsum(t, 0) * 2.0, x)  # a prefix sum over tokens
    assert check(lambda t: torch.cumsum(t, -1) * 2.0, x) is None  # along the hidden dim: per token
    assert "token dim" in check(scatter_rows, x, torch.tensor([5, 4, 3, 2, 1, 0]))  # rows written at ids


def packed_mask(pos, pm):  # transformers' packed-sequence causal mask (a model called with ids only)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from bench_lowering import packed_mask as spelled  # the bench's case, one spelling for both

    return spelled(pos, pm)


def test_transformers_packed_sequence_mask_is_generated_not_aten():
    """HF builds this mask when a model is called with ids only: cumsum of position jumps and x[batch, kv]
    picks.  The scan is a row kernel, the picks join the mask's kernel; no ATen kernel is left.  The picks'
    ids are `arange`s that stay inside the tables: read at index expressions (strided), not as gathered values."""
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None].repeat(2, 1)
    pm = torch.rand(2, 12) > 0.2
    gm, outcome = lower(packed_mask, pos, pm)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    listings = "\n".join(kir_for(k).listing() for k in generated_kernels(gm))
    assert "scan.sum" in listings and "gather" not in listings and "[c0, c2]" in listings
    want = packed_mask(pos, pm)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert torch.equal(gm(pos, pm), want)


def inverse_permutation(x, ids):  # transformers' MoE dispatch: restore the order a sort by expert changed
    _, perm = torch.sort(ids, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0), device=ids.device)
    return x[inv] * 2.0


def scatter_rows(x, ids):  # rows written at ids into a fresh tensor (negative ids from the end)
    out = torch.empty_like(x)
    out[ids] = x * 3.0 - 1.0
    return out


def test_a_write_at_ids_into_a_fresh_tensor_is_a_scatter_store():
    """out[ids] = values into an empty tensor: a kernel over the values writing each at its id (`store.at`); the
    kernel that reads the result reads memory.  Negative ids count from the end; an id outside raises on the
    host as eager's IndexError."""
    x, ids = torch.randn(12, 4), torch.randint(0, 5, (12,))
    gm, outcome = lower(inverse_permutation, x, ids)
    # the sort's ranks (lowering/small_sorts.py), and the inverse permutation is the rank: ranks, then the gather
    assert count_kernels(gm) == {"fused": 0, "pointwise": 2, "aten": 0}, outcome.near_misses
    perm = torch.randperm(12) - 6  # a permutation written with negative ids
    gm2, outcome = lower(scatter_rows, x, perm)
    assert count_kernels(gm2) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    assert "store out0[%" in kir_for(generated_kernels(gm2)[0]).listing()
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert torch.equal(gm(x, ids), inverse_permutation(x, ids))
            assert torch.equal(gm2(x, perm), scatter_rows(x, perm))
    bad = perm.clone()
    bad[3] = 12
    _both_raise_index_error(scatter_rows, gm2, x, bad)


def test_writes_at_ids_that_are_not_generated_say_why():
    def accumulate(x, ids):
        return torch.zeros_like(x).index_put((ids,), x, accumulate=True)

    def into_data(x, ids):
        out = x.clone() * 2.0
        out[ids] = x
        return out

    for fn, why in ((accumulate, "accumulate"), (into_data, "values of its own")):
        gm, outcome = lower(fn, torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 4, 5]))
        assert any(why in m for m in outcome.near_misses), outcome.near_misses
        x, ids = torch.randn(6, 3), torch.tensor([5, 4, 3, 2, 1, 0])
        assert torch.equal(gm(x, ids), fn(x, ids))


def test_arange_of_a_symbolic_length_is_generated_under_dynamic_shapes():
    """torch.arange(n) with n a symbolic size (HF's cache positions under dynamic=True): the end only sizes
    the kernel's space, passed as a shape argument; the kernel serves every n."""
    def positions(x, y):
        return torch.arange(y.shape[0], device=x.device)[:, None] * 2 + x[: y.shape[0]]

    torch._dynamo.reset()
    be = kc.backend(fusion=False)
    compiled = torch.compile(positions, backend=be, dynamic=True)
    for n in (3, 7, 12):
        x, y = torch.randn(16, 4), torch.randn(n)
        assert torch.equal(compiled(x, y), positions(x, y))
    code = "\n".join(g.passes[-1].code_after for g in be.report.graphs)
    assert "aten.arange" not in code and "kunlun.pointwise" in code


def test_a_pad_by_a_symbolic_length_stays_aten_and_says_why():
    """transformers pads its mask by the KV length minus the query length under dynamic shapes (found on CUDA:
    the pad check compared an fx Node with 0 and the whole lowering pass was skipped for the graph)."""
    def padded(x, y):
        return F.pad(x, (0, y.shape[0] - x.shape[-1])) * 2

    torch._dynamo.reset()
    be = kc.backend(fusion=False, strict=True)
    compiled = torch.compile(padded, backend=be, dynamic=True)
    for n in (9, 12, 20):
        x, y = torch.randn(3, 7), torch.randn(n)
        assert torch.equal(compiled(x, y), padded(x, y))
    misses = [m for g in be.report.graphs for p in g.passes for m in p.near_misses]
    assert any("a pad of symbolic sizes" in m for m in misses), misses


def test_rotary_tables_read_by_q_and_k_are_recomputed_in_each_rotation():
    """HF's cos/sin tables (a cat of the angles, cos, sin, the attention scaling) are read by the q and the k
    rotation: recomputed in both kernels (two math functions per element) instead of a third kernel storing them.
    Each rotation reads the angles; the result is eager's."""
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def rope(q, k, freqs):
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * 1.0).unsqueeze(1), (emb.sin() * 1.0).unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    g = torch.Generator().manual_seed(11)
    args = tuple(torch.randn(*s, generator=g) for s in [(2, 4, 5, 16), (2, 2, 5, 16), (2, 5, 8)])
    gm, outcome = lower(rope, *args)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 2, "aten": 0}, outcome.near_misses
    for key in generated_kernels(gm):
        listing = kir_for(key).listing()
        assert "cos" in listing and "sin" in listing
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            for got, want in zip(gm(*args), rope(*args)):
                torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def functional(fn):  # what the backend receives: in-place writes as functional ops (copy + slice_scatter)
    return torch.func.functionalize(fn)


def mla_assemble(q_nope, q_pe):  # DeepSeek's MLA query: a fresh buffer written by two slice assignments
    out = q_pe.new_empty(q_nope.shape[:-1] + (q_nope.shape[-1] + q_pe.shape[-1],))
    out[..., : q_nope.shape[-1]] = q_nope
    out[..., q_nope.shape[-1]:] = q_pe
    return out * 2


def column_write(x, y):
    z = x.clone()
    z[:, 2] = y
    z[:, -1] = y * 3
    return z + 1


def triangles(x):
    return torch.triu(x, diagonal=1) + torch.tril(x, -1) * 2 + torch.ones_like(x).tril()


@pytest.mark.parametrize("fn, shapes", [
    (mla_assemble, [(2, 4, 7, 16), (2, 1, 7, 8)]),
    (column_write, [(4, 5), (4,)]),
    (triangles, [(3, 6, 5)]),
], ids=["slice_writes", "select_writes", "triangles"])
def test_slice_writes_and_triangle_masks_are_generated(fn, shapes):
    """Functionalised slice assignments (`copy` + `slice_scatter` / `select_scatter` into a fresh or cloned
    buffer) and tril / triu: one kernel each, eager's values exactly.  A fresh buffer that the writes cover is
    not read (its values are anyone's: eager's are uninitialised)."""
    g = torch.Generator().manual_seed(len(shapes))
    args = [torch.randn(*s, generator=g) for s in shapes]
    if fn is mla_assemble:
        args[1] = args[1].expand(2, 4, 7, 8)  # the shared rotary part, broadcast over the heads as DeepSeek does
    gm, outcome = lower(functional(fn), *args)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    assert len(kir_for(generated_kernels(gm)[0]).inputs) == len(args)  # the buffer is not an input
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert torch.equal(gm(*args), fn(*args))


def test_a_fresh_buffer_read_other_than_by_slice_writes_stays_an_allocation():
    """An uninitialised buffer is a kernel only where slice writes fill it; returned or read as it is, it stays
    `new_empty` (an allocation, no kernel), with the reason."""
    def f(x):
        return x.new_empty(x.shape), x * 2

    gm, outcome = lower(f, torch.randn(3, 4))
    assert any("uninitialised buffer" in m for m in outcome.near_misses), outcome.near_misses
    assert "new_empty" in gm.code


def complex_rope(q, k, freqs):  # DeepSeek-V2 / Llama4: the rotation as a product of complex numbers
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs) * 1.0
    qc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
    kc = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
    fc = freqs_cis.unsqueeze(1)
    return torch.view_as_real(qc * fc).flatten(3).to(q.dtype), torch.view_as_real(kc * fc).flatten(3).to(k.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_complex_rotations_are_real_pairs_in_generated_kernels(dtype):
    """polar, view_as_complex, the complex product and view_as_real become real and imaginary parts: the q and k
    rotations are one kernel each (freqs_cis recomputed in both); within a unit of eager's complex product."""
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 4, 7, 16, generator=g).to(dtype), torch.randn(2, 1, 7, 16, generator=g).to(dtype),
            torch.randn(2, 7, 8, generator=g))
    gm, outcome = lower(complex_rope, *args)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 2, "aten": 0}, outcome.near_misses
    want = complex_rope(*args)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            for got, w in zip(gm(*args), want):
                torch.testing.assert_close(got, w, rtol=torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)


def test_a_complex_value_read_outside_stays_complex():
    def f(x, freqs):
        c = torch.polar(torch.ones_like(freqs), freqs)
        return torch.view_as_real(torch.view_as_complex(x) * c), c  # c itself leaves the graph

    gm, outcome = lower(f, torch.randn(3, 4, 2), torch.randn(3, 4))
    assert "polar" in gm.code
    got, want = gm(torch.ones(3, 4, 2), torch.zeros(3, 4)), f(torch.ones(3, 4, 2), torch.zeros(3, 4))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def llama4_router(logits, x):  # top-k scores scattered into -inf, read transposed; rows repeated per expert
    vals, idx = torch.topk(logits, 2, dim=1)
    scores = torch.full_like(logits, float("-inf")).scatter(1, idx, vals).transpose(0, 1)
    return torch.sigmoid(scores), x.repeat(4, 1) * 2


def test_scatter_of_values_and_repeat_are_generated():
    """scatter.src (each id takes src at its own position) read through a transpose, and repeat: generated, eager's
    values exactly.  The ids are range-checked on the host along the scatter's own dim (8 experts), not the
    kernel's dim of the same index (7 tokens)."""
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(7, 8, generator=g), torch.randn(7, 16, generator=g))
    gm, outcome = lower(llama4_router, *args)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 2, "aten": 1}, outcome.near_misses  # the top-k
    want = llama4_router(*args)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            scores, rows = gm(*args)
        torch.testing.assert_close(scores, want[0], rtol=2e-7, atol=0)  # sigmoid: within a unit of eager's
        assert torch.equal(scores == 0, want[0] == 0) and torch.equal(rows, want[1])

    def marks(ids):  # scatter.value read transposed: ids up to 7 into 8 columns, 5 rows
        return torch.zeros(5, 8).scatter(1, ids, 1.0).t() * 3

    ids = torch.tensor([[7, 0], [1, 7], [2, 3], [7, 6], [4, 5]])
    gm, outcome = lower(marks, ids)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    assert torch.equal(gm(ids), marks(ids))

    def routed(ids, x):  # Llama4: the scores flattened to one per (expert, token) row, times the repeated tokens
        scores = torch.zeros(5, 8).scatter(1, ids, 1.0).t().reshape(-1, 1)
        return x.repeat(8, 1) * scores

    x = torch.randn(5, 3, generator=g)
    gm, outcome = lower(routed, ids, x)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    assert torch.equal(gm(ids, x), routed(ids, x))
    with pytest.raises(IndexError):  # an id past the 8 experts: eager's error, from the host check
        gm(torch.full((5, 2), 8), x)


def chunk_pads(q, g):  # Qwen3-Next's chunked delta rule pads the sequence to whole chunks; a crop and a fill value
    return F.pad(q, (0, 0, 0, 3)) * 2, F.pad(g, (0, 3)) + 1, F.pad(q, (1, -2, 2, 0), value=-1.5)


def state_copies(x):  # a cache state written by copy_ into fresh zeros (the last tokens, a scaled value, a
    s = torch.zeros(2, 5, 4)  # transposed value: the state is contiguous whatever the source's layout)
    s.copy_(x[..., -4:])
    return s * 1, torch.zeros_like(x).copy_(x * 2), torch.zeros(2, 9, 5).copy_((x * 3).transpose(1, 2))


@pytest.mark.parametrize("fn, shapes", [(chunk_pads, [(2, 5, 7, 4), (2, 5, 7)]), (state_copies, [(2, 5, 9)])],
                         ids=["pads", "copies"])
def test_pads_and_whole_tensor_copies_are_generated(fn, shapes):
    g = torch.Generator().manual_seed(9)
    args = [torch.randn(*s, generator=g) for s in shapes]
    gm, outcome = lower(functional(fn), *args)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    want = fn(*args)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            got = gm(*args)
        assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(got, want))


def causal_conv(x, w):  # Qwen3-Next's short convolution: per channel over the sequence, width 4, causal, then silu
    y = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), None, padding=3, groups=x.shape[-1])[..., : x.shape[1]]
    return F.silu(y).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_depthwise_causal_conv_is_one_kernel_with_its_activation(dtype):
    """The taps are summed in order in fp32 (half inputs too, as eager's kernels accumulate): as close to the
    float64 result as eager, within a few units."""
    g = torch.Generator().manual_seed(6)
    args = (torch.randn(2, 7, 16, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype))
    gm, outcome = lower(causal_conv, *args)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    ref, want = causal_conv(*[a.double() for a in args]), causal_conv(*args)
    eps, scale = torch.finfo(dtype).eps, ref.abs().max().item()
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            got = gm(*args)
        assert (got.double() - ref).abs().max() <= (want.double() - ref).abs().max() + 4 * eps * scale


def test_convolutions_other_than_depthwise_1d_stay_aten_and_say_why():
    x, w = torch.randn(1, 4, 9), torch.randn(6, 4, 3)
    gm, outcome = lower(lambda a, b: F.conv1d(a, b) * 2, x, w)
    assert any("depthwise" in m for m in outcome.near_misses), outcome.near_misses
    torch.testing.assert_close(gm(x, w), F.conv1d(x, w) * 2)


def test_cache_rows_gathered_once_for_q_and_k_are_recomputed_in_each_rotation():
    """vLLM's form: the cos/sin cache rows picked by the positions, chunked into halves, each half unsqueezed for
    the q and the k rotation.  The pick and its views are cheap: each rotation gathers its own (two kernels, no
    third storing the rows), eager's values."""
    def rope(q, k, cache, positions):
        cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)

        def rotate(x):
            x1, x2 = x.chunk(2, dim=-1)
            c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
            return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        return rotate(q), rotate(k)

    g = torch.Generator().manual_seed(12)
    args = (torch.randn(5, 4, 16, generator=g), torch.randn(5, 2, 16, generator=g), torch.randn(32, 16, generator=g),
            torch.randint(0, 32, (5,), generator=g))
    gm, outcome = lower(rope, *args)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 2, "aten": 0}, outcome.near_misses
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert all(torch.equal(a, b) for a, b in zip(gm(*args), rope(*args)))
    with pytest.raises(IndexError):  # a position past the cache: eager's error, checked on the host
        gm(*args[:3], torch.full((5,), 32))


def test_a_gather_read_through_a_shifted_view_still_checks_its_ids():
    """Every id of a gather is read by eager (it raises for any outside the table), also where the kernel reads
    only shifted rows of the result: the ids input is range-checked on the host as a whole."""
    def f(table, ids):
        rows = table.index_select(0, ids) * 2.0
        return rows[1:] + rows[:-1]

    table, ids = torch.randn(10, 4), torch.tensor([0, 3, 9, 2])
    gm, outcome = lower(f, table, ids)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    torch.testing.assert_close(gm(table, ids), f(table, ids))
    with pytest.raises(IndexError):
        gm(table, torch.tensor([10, 0, 1, 2]))  # the first id: read by eager's gather, not by the kernel's rows


def test_a_row_kernel_does_not_take_a_scatter_store_of_its_result():
    """`out[perm] = softmax(x)` into a fresh tensor: the store at ids is its own kernel after the row kernel (a row
    kernel writes its rows where they are); no cluster refused, eager's values."""
    def f(x, perm):
        out = torch.empty_like(x)
        out[perm] = torch.softmax(x, -1)
        return out * 2

    g = torch.Generator().manual_seed(13)
    x, perm = torch.randn(6, 40, generator=g), torch.randperm(6, generator=g)
    gm, outcome = lower(functional(f), x, perm)
    assert count_kernels(gm)["aten"] == 0 and not [m for m in outcome.near_misses if m.startswith("cluster at")], \
        outcome.near_misses
    listings = [kir_for(k).listing() for k in generated_kernels(gm)]
    assert any("store out0[%" in t for t in listings) and not any("store out0[%" in t and "reduce" in t
                                                                    for t in listings)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            torch.testing.assert_close(gm(x, perm), f(x, perm))


def test_packed_mask_picks_under_symbolic_sizes_are_index_expressions():
    """Under dynamic shapes the kv length is a symbol: `pm[b, k]` with k = arange(T) over pm's T columns still
    provably stays inside (the same symbol), so it is a strided read; eager's values at two lengths."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from kunlun_compile.config import CompileConfig
    from kunlun_compile.passes import PassContext
    from kunlun_compile.passes.lower_elementwise import lower_elementwise

    pos = torch.cat([torch.arange(7), torch.arange(5)])[None].repeat(2, 1)
    pm = torch.rand(2, 12) > 0.2
    gm = make_fx(packed_mask, tracing_mode="symbolic")(pos, pm)
    outcome = lower_elementwise(gm, PassContext(CompileConfig(), "t"))
    gm.recompile()
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    listings = "\n".join(kir_for(k).listing() for k in generated_kernels(gm))
    assert "gather" not in listings
    for t in (12, 5):
        p, m = pos[:, :t], pm[:, :t]
        for interpreted in (False, True):
            with cpu_kernels(interpreted):
                assert torch.equal(gm(p, m), packed_mask(p, m))


def test_a_producer_read_by_recomputed_copies_is_clustered_again():
    """The angles are computed (x * 2) and also read by a matmul: they stay a kernel, while the cos/sin built
    from them are copied into the q and k rotations.  The next recompute round meets the copies among the
    angles' readers (they belong to the rotations' kernels)."""
    def rope(q, k, x, w):
        freqs = x * 2.0
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * 1.0).unsqueeze(1), (emb.sin() * 1.0).unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, freqs @ w

    g = torch.Generator().manual_seed(14)
    args = tuple(torch.randn(*s, generator=g) for s in [(2, 4, 5, 16), (2, 2, 5, 16), (2, 5, 8), (8, 3)])
    gm, outcome = lower(rope, *args)
    assert count_kernels(gm)["pointwise"] == 3, outcome.near_misses  # the angles, the q and the k rotation
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            for got, want in zip(gm(*args), rope(*args)):
                torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
