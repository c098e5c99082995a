"""The attention kernel on CUDA against its torch reference (skipped without CUDA)."""
import pytest
import torch

from kunlun_compile.models.attention_op import attention, attention_reference
from kunlun_compile.models.layers import build_attention_mask

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,nq,nkv,d,window", [(1, 16, 2, 128, None), (129, 8, 2, 256, None), (300, 4, 4, 64, 17)])
def test_attention_kernel_on_cuda(T, nq, nkv, d, window, dtype):
    g = torch.Generator().manual_seed(T)
    qkv = torch.randn(T, (nq + 2 * nkv) * d, generator=g).to(dtype).cuda()
    q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    mask = build_attention_mask(torch.arange(T, device="cuda") + 3, window, dtype)
    args = (q, k, v, mask, nq, nkv, d, d ** -0.5)
    got, want = attention(*args), attention_reference(*args)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
