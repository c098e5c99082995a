"""The Kernel wrapper: which launch flags a kernel that declares PDL gets, by device and switch."""
import torch
import triton.language as tl

from kunlun_compile import triton_kernel as tk


def _with_pdl(x_ptr, PDL: tl.constexpr):
    pass


def _without_pdl(x_ptr):
    pass


class _Recorder:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: kwargs


def test_pdl_flags_by_device_and_switch(monkeypatch):
    assert tk.Kernel(_with_pdl).pdl and not tk.Kernel(_without_pdl).pdl
    on = tk._PDLLauncher(_Recorder(), True)
    assert on[(1,)](0) == {"PDL": True, "launch_pdl": True}
    assert tk._PDLLauncher(_Recorder(), False)[(1,)](0) == {"PDL": False}
    k = tk.Kernel(_with_pdl)
    monkeypatch.setattr(k, "_compiled_fn", lambda: _Recorder())
    assert k.on(torch.device("cuda"))[(1,)](0) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("KUNLUN_COMPILE_PDL", "0")
    assert k.on(torch.device("cuda"))[(1,)](0) == {"PDL": False}
    plain, sentinel = tk.Kernel(_without_pdl), object()
    monkeypatch.setattr(plain, "_compiled_fn", lambda: sentinel)
    assert plain.on(torch.device("cuda")) is sentinel  # a kernel without PDL is launched as it is
