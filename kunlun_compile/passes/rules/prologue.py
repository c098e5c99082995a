"""norm_rope_gate: the attention prologue -> kunlun::split_norm_rope_gate.  Stage two: chains of primitives.

The search function is the prologue of a vLLM attention layer as the model code writes it: split the fused
qkv(+gate) projection, optional per-head Q/K RMSNorm (vLLM or Gemma style), and the rotation against
`cos_sin_cache[positions]`.  By the time these rules run, the rotation -- neox halves or GPT-J pairs, over
the whole head or its first `rotary_dim` dims -- is one `kunlun::rotary` node (`rotary.py`) whose tables
are the cache's halves widened to the rotated width; so a rule is only (gated or not) x (norm kind) x (how
the halves were widened), and head counts and sizes are read back from the match.
"""
from __future__ import annotations

import itertools

import torch

from ..pattern_engine import Bindings, Refusal, Rewrite
from . import guards as g
from .norms import EPS, gemma_lone, vllm_lone
from .rotary import ROTARY, shared_rotation, widened_tables

aten = torch.ops.aten
# Gemma first: in fp32 its `x * (1 + w)` is also a vLLM norm whose weight is `1 + w`
NORMS = {"gemma": gemma_lone, "vllm": vllm_lone, "none": None}
# The kernel keeps one head per tile row in registers and loads 16-byte vectors: head_dim a multiple of 8, <= 512.
MAX_HEAD_DIM = 512
# example sizes for tracing; all different so no view or slice of them is a no-op by accident
_T, _NQ, _NKV, _D, _P = 5, 4, 2, 16, 32
_FREE = ((ROTARY, 3), (ROTARY, 4))  # neox and rotary_dim: read by the guard


def _rope(positions, q, k, cache, head_dim: int, neox: bool):
    """vLLM's rotary from the cache, its rotation already a primitive.  The result stays per head
    ([tokens, heads, head_dim]): the model's reshape back to its input's shape is left outside the match,
    because a model that feeds the heads straight to attention (vLLM's Qwen3) has that reshape cancelled
    against attention's own view by canonicalisation."""
    positions = positions.flatten()
    num_tokens = positions.shape[0]
    cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
    # vLLM's `apply_rotary_emb` unsqueezes and widens the tables for each rotation; `rotary.share_tables` has
    # made q's and k's read one pair by now
    x_cos, x_sin = widened_tables(cos.unsqueeze(-2), sin.unsqueeze(-2), neox)

    def apply(x):
        return torch.ops.kunlun.rotary(x.view(num_tokens, -1, head_dim), x_cos, x_sin, neox, head_dim)

    return apply(q), apply(k)


def _make_search(gated: bool, norm: str, neox: bool, nq: int, nkv: int, d: int):
    norm_fn = NORMS[norm]

    def prologue(qkv, q_weight, k_weight, cache, positions, eps):
        q_size, kv_size = nq * d, nkv * d
        if gated:
            q_gate, k, v = qkv.split([q_size * 2, kv_size, kv_size], dim=-1)
            lead = q_gate.shape[:-1]
            q, gate = torch.chunk(q_gate.view(*lead, nq, -1), 2, dim=-1)
            q, gate = q.reshape(*lead, -1), gate.reshape(*lead, -1)
        else:
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if norm_fn is not None:
            q = norm_fn(q.view(-1, nq, d), q_weight, eps).view(-1, q_size)
            k = norm_fn(k.view(-1, nkv, d), k_weight, eps).view(-1, kv_size)
        q, k = _rope(positions, q, k, cache, d, neox)
        return (q, k, v, gate) if gated else (q, k, v)

    if norm_fn is not None:
        return prologue

    def prologue_without_norm(qkv, cache, positions):
        return prologue(qkv, None, None, cache, positions, None)
    return prologue_without_norm


def _replace(*tensors, norm: str, gated: bool, neox: bool, eps=None, nq, nkv, head_dim, rotary_dim):
    if norm == "none":
        (qkv, cache, positions), q_weight, k_weight = tensors, None, None
    else:
        qkv, q_weight, k_weight, cache, positions = tensors
    q, k, gate = torch.ops.kunlun.split_norm_rope_gate(
        qkv, q_weight, k_weight, cache, positions, nq, nkv, head_dim, rotary_dim,
        1e-6 if eps is None else eps, 1.0 if norm == "gemma" else 0.0, gated, neox)
    kv_size = nkv * head_dim
    v = qkv[:, qkv.shape[1] - kv_size:]
    q, k = q.view(-1, nq, head_dim), k.view(-1, nkv, head_dim)
    return (q, k, v, gate) if gated else (q, k, v)


def _example_inputs(dtype, norm: str, gated: bool):
    rotary = _D
    cols = (_NQ * (2 if gated else 1) + 2 * _NKV) * _D
    qkv = torch.randn(_T, cols, dtype=dtype)
    cache = torch.randn(_P, rotary, dtype=dtype)
    positions = torch.randint(0, _P, (_T,))
    if norm == "none":
        return qkv, cache, positions
    return qkv, torch.randn(_D, dtype=dtype), torch.randn(_D, dtype=dtype), cache, positions


def _head_sizes(b: Bindings, gated: bool, rotary_dim: int):
    """(nq, nkv, head_dim) read from the matched split and views, or a reason."""
    split = b.nodes(aten.split_with_sizes.default)
    if len(split) != 1:
        return "the qkv split is not one split_with_sizes"
    sizes = split[0].args[1]
    if len(sizes) != 3 or not all(isinstance(s, int) for s in sizes) or sizes[1] != sizes[2]:
        return f"qkv split sizes {sizes} are not [q, kv, kv] constants"
    views = [n.meta["val"] for n in b.nodes(aten.view.default) if n.meta["val"].dim() == 3]
    last_dims = {int(v.shape[-1]) for v in views if isinstance(v.shape[-1], int)}
    if not last_dims:
        return "no per-head view found"
    # the per-head views are [.., D], the gated q view [.., 2D], GPT-J's re-interleaved part [.., rotary_dim]
    d = max(last_dims) // 2 if gated else max(last_dims)
    if not last_dims <= {d, 2 * d, rotary_dim}:
        return f"per-head views disagree on head_dim: {sorted(last_dims)}"
    q_cols = sizes[0] // 2 if gated else sizes[0]
    if q_cols % d or sizes[1] % d:
        return f"qkv split sizes {sizes} are not whole heads of {d}"
    return q_cols // d, sizes[1] // d, d


def _guard(b: Bindings, norm: str, gated: bool, neox: bool):
    qkv, cache, positions = b.val("qkv"), b.val("cache"), b.val("positions")
    rotation = shared_rotation(b)
    if isinstance(rotation, str) or rotation[0] != neox:
        return Refusal(rotation if isinstance(rotation, str) else f"the rotation is {'pairs' if neox else 'neox'}")
    rotary_dim = rotation[1]
    sizes = _head_sizes(b, gated, rotary_dim)
    if isinstance(sizes, str):
        return Refusal(sizes)
    nq, nkv, d = sizes
    reason = g.first(
        g.float_dtype(qkv, "qkv"),
        None if qkv.dim() == 2 else f"qkv is {qkv.dim()}-D; the op takes [tokens, columns]",
        None if cache.dtype in (qkv.dtype, torch.float32) else f"cos_sin_cache dtype {cache.dtype}",
        None if positions.dim() == 1 and positions.dtype in (torch.int32, torch.int64)
        else f"positions {tuple(positions.shape)} {positions.dtype}: need 1-D int",
        None if d % 8 == 0 and d <= MAX_HEAD_DIM
        else f"head_dim {d} is not supported by the kernel (a multiple of 8, at most {MAX_HEAD_DIM})",
        None if 0 < rotary_dim <= d and rotary_dim % 2 == 0 else f"rotary_dim {rotary_dim} for head_dim {d}",
        None if g.known_equal(cache.shape[1], rotary_dim)
        else f"cos_sin_cache width {cache.shape[1]} is not rotary_dim {rotary_dim}",
    )
    if not reason and norm != "none":
        qw, kw = b.val("q_weight"), b.val("k_weight")
        reason = g.first(g.positive_eps(b.scalar("eps")), g.vector_of(qw, d, "q_weight"),
                         g.vector_of(kw, d, "k_weight"),
                         None if norm == "gemma" else g.same_dtype(qkv, qw, "qkv and q_weight"),
                         None if norm == "gemma" else g.same_dtype(qkv, kw, "qkv and k_weight"))
    if reason:
        return Refusal(reason)
    return {"nq": nq, "nkv": nkv, "head_dim": d, "rotary_dim": rotary_dim}


def _rule(gated: bool, norm: str, neox: bool) -> Rewrite:
    name = "_".join([("gated" if gated else "plain"), f"{norm}norm", ("neox" if neox else "gptj")])
    search = _make_search(gated, norm, neox, _NQ, _NKV, _D)

    def replace(*tensors, **params):
        return _replace(*tensors, norm=norm, gated=gated, neox=neox, **params)

    return Rewrite(family="norm_rope_gate", name=name, search=search, replace=replace,
                   example_inputs=lambda dtype: _example_inputs(dtype, norm, gated),
                   constants={"eps": EPS} if norm != "none" else {},
                   guard=lambda b: _guard(b, norm, gated, neox), free_arguments=_FREE,
                   # GPT-J tables are interleaved by a stack, a gate's chunk copied, a norm has rsqrt (tested)
                   needs=(ROTARY, aten.split_with_sizes.default, aten.index_select.default) +
                   (() if neox else (aten.stack.default,)) +
                   ((aten.clone.default,) if gated else ()) + ((aten.rsqrt.default,) if norm != "none" else ()))


# ---- the rotation alone, on q and k from anywhere (a full-width Q/K norm before it: vLLM's Olmoe) -------------

def _rope_anywhere(neox: bool):
    def rope_anywhere(q, k, cache, positions):
        return _rope(positions, q, k, cache, _D, neox)
    return rope_anywhere


def _rope_anywhere_inputs(dtype):
    return (torch.randn(_T, _NQ * _D, dtype=dtype), torch.randn(_T, _NKV * _D, dtype=dtype),
            torch.randn(_P, _D, dtype=dtype), torch.randint(0, _P, (_T,)))


def _rope_anywhere_guard(b: Bindings):
    q, k, cache, positions = b.val("q"), b.val("k"), b.val("cache"), b.val("positions")
    rotation = shared_rotation(b)
    if isinstance(rotation, str):
        return Refusal(rotation)
    neox, rotary_dim = rotation
    views = [n.meta["val"] for n in b.nodes(aten.view.default) if n.meta["val"].dim() == 3]
    heads = {int(v.shape[-1]) for v in views if isinstance(v.shape[-1], int)}
    d = max(heads) if heads else None
    reason = g.first(
        None if d is not None and heads <= {d, rotary_dim} else f"per-head views disagree on head_dim: {heads}",
        g.float_dtype(q, "q"), g.same_dtype(q, k, "q and k"),
        # the op rotates in q's dtype; a float32 cache would promote the model's products
        g.same_dtype(q, cache, "q and cos_sin_cache"),
        None if q.dim() == 2 and k.dim() == 2 else f"q {tuple(q.shape)}, k {tuple(k.shape)}: need [tokens, columns]",
        None if positions.dim() == 1 and positions.dtype in (torch.int32, torch.int64)
        else f"positions {tuple(positions.shape)} {positions.dtype}: need 1-D int",
        None if d is None or (d % 8 == 0 and d <= MAX_HEAD_DIM)
        else f"head_dim {d} is not supported by the kernel (a multiple of 8, at most {MAX_HEAD_DIM})",
        None if g.known_equal(cache.shape[1], rotary_dim)
        else f"cos_sin_cache width {cache.shape[1]} is not rotary_dim {rotary_dim}")
    if reason:
        return Refusal(reason)
    return {"head_dim": d, "rotary_dim": rotary_dim, "neox": neox}


def _rope_anywhere_fused(q, k, cache, positions, *, head_dim, rotary_dim, neox):
    num_tokens = positions.numel()
    cos, sin = cache.index_select(0, positions.flatten()).chunk(2, dim=-1)  # half-width, read in place
    return torch.ops.kunlun.qk_norm_rope(q.view(num_tokens, -1, head_dim), k.view(num_tokens, -1, head_dim),
                                         None, None, cos, sin, 1e-6, 0.0, neox, False, True)


RULES = [_rule(gated, norm, neox) for gated, norm, neox in itertools.product((True, False), NORMS, (True, False))]
# last: where the qkv split is in the match, the rules above take it (and the norms with it)
RULES += [Rewrite(family="norm_rope_gate", name=f"rope_anywhere_{'neox' if neox else 'gptj'}",
                 search=_rope_anywhere(neox), replace=_rope_anywhere_fused, example_inputs=_rope_anywhere_inputs,
                 guard=_rope_anywhere_guard, free_arguments=_FREE,
                 needs=(ROTARY, aten.index_select.default) + (() if neox else (aten.stack.default,)))
          for neox in (True, False)]
