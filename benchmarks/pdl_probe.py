"""Does programmatic dependent launch (PDL) shorten a chain of small dependent kernels inside a CUDA graph?

A chain of CHAIN launches of a one-program kernel (y = x + 1 over 2048 elements, and a 256-program
variant), captured in one CUDA graph, timed per launch: plain, PDL with the wait at the top, and PDL
that also lets the next kernel launch as soon as this one starts.  Checks the chain's result.

    python benchmarks/pdl_probe.py
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

CHAIN = 64


@triton.jit
def _add_one(x_ptr, y_ptr, n, PDL: tl.constexpr, EARLY: tl.constexpr, BLOCK: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)


def chain(bufs, programs, pdl, early):
    for i in range(CHAIN):
        _add_one[(programs,)](bufs[i % 2], bufs[(i + 1) % 2], programs * 2048, PDL=pdl, EARLY=early, BLOCK=2048,
                              launch_pdl=pdl)


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for programs in (1, 256):
        for pdl, early in ((False, False), (True, False), (True, True)):
            bufs = [torch.zeros(programs * 2048, device="cuda"), torch.zeros(programs * 2048, device="cuda")]
            chain(bufs, programs, pdl, early)
            torch.cuda.synchronize()
            ok = bool((bufs[CHAIN % 2] == CHAIN).all())
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain(bufs, programs, pdl, early)
            for b in bufs:
                b.zero_()
            g.replay()
            torch.cuda.synchronize()
            ok = ok and bool((bufs[CHAIN % 2] == CHAIN).all())
            t = do_bench_cudagraph(lambda: chain(bufs, programs, pdl, early), rep=50)
            print(f"programs {programs:4d} pdl {pdl!s:5} early {early!s:5}: {t / CHAIN * 1e3:6.2f} us per launch, "
                  f"chain result {'ok' if ok else 'WRONG'}", flush=True)


if __name__ == "__main__":
    main()
