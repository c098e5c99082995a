import copy
import os

import pytest
import torch

# Without a GPU, the kunlun:: ops run their real Triton kernels through Triton's
# interpreter: that needs TRITON_INTERPRET=1 before triton is imported (it is
# imported by torch._dynamo and by kunlun_compile, both after this line).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run the backend strict unless a test is about the fallback itself.
STRICT = {"strict": True}


@pytest.fixture(autouse=True, scope="session")
def record_kernel_launches():
    """KUNLUN_COMPILE_RECORD_LAUNCHES=FILE: every interpreted kernel launch of the run is recorded there, for
    `python -m tests.gpu_compile < FILE`, which compiles each for Hopper without a GPU (tests/gpu_compile.py)."""
    path = os.environ.get("KUNLUN_COMPILE_RECORD_LAUNCHES")
    if not path:
        yield
        return
    import json

    from .gpu_compile import recording_launches, unique

    with recording_launches() as specs:
        yield
    with open(path, "w") as f:
        json.dump(unique(specs), f)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite values in output"
    return ((got - want).norm() / want.norm()).item()


def float64_reference(model, inputs):
    """Run a float64 copy of the model (integer inputs unchanged)."""
    m64 = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        return m64(*inputs)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda():
            item.add_marker(skip_gpu)


os.environ.pop("KUNLUN_COMPILE_DISABLE", None)
os.environ.pop("KUNLUN_COMPILE_STRICT", None)


def compiled_and_eager(model, *inputs, **options):
    """(compiled result, eager result, the backend's report, every pass's near misses), compiled strict."""
    import kunlun_compile as kc

    compiled = kc.compile(model, strict=True, **options)
    with torch.no_grad():
        got, want = compiled(*inputs), model(*inputs)
    report = compiled.kunlun_backend.report
    return got, want, report, [line for g in report.graphs for p in g.passes for line in p.near_misses]
