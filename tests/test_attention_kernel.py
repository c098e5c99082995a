"""The built-in models' attention kernel against its torch reference (Triton interpreter on the CPU)."""
import pytest
import torch

from kunlun_compile.models.attention_kernel import attention_triton
from kunlun_compile.models.attention_op import attention_reference
from kunlun_compile.models.layers import build_attention_mask
from kunlun_compile.ops import interpreter_usable

needs_interpreter = pytest.mark.skipif(not interpreter_usable(), reason="needs TRITON_INTERPRET=1 at start-up")


@needs_interpreter
@pytest.mark.parametrize("T,nq,nkv,d,window", [(1, 4, 2, 16, None), (37, 4, 1, 24, None), (70, 2, 2, 32, 9)])
def test_kernel_matches_reference(T, nq, nkv, d, window):
    g = torch.Generator().manual_seed(T)
    qkv = torch.randn(T, (nq + 2 * nkv) * d, generator=g)
    q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)  # strided views, as the model passes them
    mask = build_attention_mask(torch.arange(T) + 5, window, torch.float32)
    args = (q, k, v, mask, nq, nkv, d, d ** -0.5)
    got, want = attention_triton(*args), attention_reference(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
