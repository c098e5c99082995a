"""kunlun::attention_mask against the masks models build by hand."""
import pytest
import torch

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import cpu_kernels

from .op_helpers import PATHS, seeded


def mask_by_definition(qp, kp, valid, causal, window, dtype, masked_value):
    """Element by element from the definition."""
    batched = qp.dim() == 2
    qp, kp = (qp, kp) if batched else (qp[None], kp[None])
    valid = valid if valid is None or batched else valid[None]
    out = torch.empty(qp.shape[0], qp.shape[1], kp.shape[1], dtype=torch.bool)
    for b in range(qp.shape[0]):
        for i, q in enumerate(qp[b].tolist()):
            for j, k in enumerate(kp[b].tolist()):
                ok = (not causal or k <= q) and (window == 0 or q - k < window)
                out[b, i, j] = ok and (valid is None or bool(valid[b, j]))
    out = out if batched else out[0]
    if dtype == torch.bool:
        return out
    return torch.where(out, 0.0, masked_value).to(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,window,padded", [(True, 0, False), (True, 5, False), (True, 0, True),
                                                  (True, 4, True), (False, 0, True)])
def test_attention_mask(path, dtype, causal, window, padded):
    gen = seeded("mask", path, dtype, causal, window, padded)
    if padded:  # a padded batch: [B, T] query and [B, S] key positions and a key padding mask
        qp = torch.randint(0, 40, (3, 9), generator=gen)
        kp = torch.randint(0, 40, (3, 37), generator=gen)
        valid = torch.rand(3, 37, generator=gen) > 0.3
    else:  # one sequence, prefix of 7 cached positions
        qp = torch.arange(7, 40)
        kp = torch.arange(0, 40)
        valid = None
    args = (qp, kp, valid, causal, window, dtype, -1e4 if padded else float("-inf"))
    with cpu_kernels(path == "triton"):
        got = torch.ops.kunlun.attention_mask(*args)
    want = mask_by_definition(*args)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [None, 6])
def test_matches_the_model_mask(path, window):
    from kunlun_compile.models.layers import build_attention_mask

    pos = torch.arange(50) + 3
    with cpu_kernels(path == "triton"):
        got = torch.ops.kunlun.attention_mask(pos, pos, None, True, window or 0, torch.float16, float("-inf"))
    assert torch.equal(got, build_attention_mask(pos, window, torch.float16))


def test_bad_args_and_opcheck():
    gen = seeded("mask-bad-args")
    op = torch.ops.kunlun.attention_mask
    p = torch.arange(5)
    with pytest.raises(ValueError, match="positions must be"):
        op(p, p[None], None, True, 0, torch.bool, 0.0)
    with pytest.raises(ValueError, match="int32 or int64"):
        op(p.float(), p, None, True, 0, torch.bool, 0.0)
    with pytest.raises(ValueError, match="key_valid"):
        op(p, p, torch.ones(4, dtype=torch.bool), True, 0, torch.bool, 0.0)
    with pytest.raises(ValueError, match="sliding_window"):
        op(p, p, None, True, -1, torch.bool, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        op(p, p, None, True, 0, torch.int32, 0.0)
    torch.library.opcheck(op.default, (p, p, torch.rand(5, generator=gen) > 0.5, True, 2, torch.float32, -1e4))
    torch.library.opcheck(op.default, (p[None], p[None], None, True, 0, torch.bool, 0.0))


@pytest.mark.parametrize("path", PATHS)
def test_positions_broadcast_over_the_batch_are_read_in_place(path, monkeypatch):
    """[B, T] positions expanded from one row (batch stride 0, what the mask recogniser passes) and sliced
    rows (a batch stride larger than the row) give the result of contiguous copies."""
    gen = seeded("broadcast positions", path)
    q, k = torch.arange(5, 14), torch.randint(0, 20, (3, 2 * 13), generator=gen)[:, ::2]
    valid = torch.rand(3, 13, generator=gen) > 0.3
    for q_rows, k_rows in ((q.expand(3, 9), torch.arange(13).expand(3, 13)), (q.expand(3, 9), k)):
        with cpu_kernels(path == "triton"):
            got = torch.ops.kunlun.attention_mask(q_rows, k_rows, valid, True, 7, torch.bfloat16, -1e4)
            want = torch.ops.kunlun.attention_mask(q_rows.contiguous(), k_rows.contiguous(), valid, True, 7,
                                                   torch.bfloat16, -1e4)
        assert torch.equal(got, want) and (got == 0).any() and (got != 0).any()
    if path == "triton":  # the kernel is handed the expanded rows themselves, not contiguous copies
        from kunlun_compile.ops import attention_mask

        launched, kernel = [], attention_mask._attention_mask_kernel

        class Spy:  # `kernel.on(device)[grid](*args)`, recording the positions it is handed
            def on(self, device):
                return self if launched.append(device) is None else None

            def __getitem__(self, grid):
                return lambda *a, **kw: launched.append(a[:2]) or kernel.on(launched.pop(0))[grid](*a, **kw)
        monkeypatch.setattr(attention_mask, "_attention_mask_kernel", Spy())
        k_row = torch.arange(13)
        with cpu_kernels(True):
            torch.ops.kunlun.attention_mask(q.expand(3, 9), k_row.expand(3, 13), valid, True, 7, torch.bool, 0.0)
        (qp, kp), = launched
        assert (qp.data_ptr(), kp.data_ptr()) == (q.data_ptr(), k_row.data_ptr()) and qp.stride(0) == kp.stride(0) == 0
