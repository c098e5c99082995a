"""One Triton kernel for the built-in models' attention op (CUDA; interpreter in tests).

Program (token t, query head h): q row in fp32, keys and values of kv head
h // (nq / nkv) in blocks of BLOCK_N, scores `q·k * scale + mask[t, n]`, online
softmax (running max and sum; a block whose keys are all masked contributes
nothing), out = Σ p v / Σ p, cast to q's dtype.  Same contract as the op's
torch reference (softmax in fp32); one launch instead of ~10 ATen kernels
per layer, which is what a serving engine's attention backend is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_kernel import kernel, wait_for_producers

BLOCK_N = 32


@kernel
def _attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, T, sq, sk, sv, sm, so, scale,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      PDL: tl.constexpr):
    wait_for_producers(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    q = tl.load(q_ptr + t * sq + h * HEAD_DIM + d, mask=dm, other=0.0).to(tl.float32)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, T, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nm = n < T
        kv_mask = nm[:, None] & dm[None, :]
        k = tl.load(k_ptr + n[:, None] * sk + kvh * HEAD_DIM + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s += tl.load(mask_ptr + t * sm + n, mask=nm, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # every key so far masked: nothing to rescale
        p = tl.exp(s - m_safe)
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_ptr + n[:, None] * sv + kvh * HEAD_DIM + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc / l_i
    tl.store(out_ptr + t * so + h * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=dm)


def attention_triton(q, k, v, mask, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
    T = q.shape[0]
    out = torch.empty(T, num_heads * head_dim, dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    for name, x in (("q", q), ("k", k), ("v", v), ("mask", mask)):
        if x.stride(-1) != 1:
            raise ValueError(f"attention: {name} must have unit stride in its last dim")
    _attention_kernel.on(q.device)[(T, num_heads)](
        q, k, v, mask, out, T, q.stride(0), k.stride(0), v.stride(0), mask.stride(0), out.stride(0), scale,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=BLOCK_N, num_warps=4)
    return out
