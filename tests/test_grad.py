"""Inference backend: graphs that need gradients run eagerly, with one warning."""
import warnings

import torch

import kunlun_compile as kc
from kunlun_compile.utils import KunlunCompileWarning


def test_grad_mode_runs_eagerly_with_correct_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    ref.load_state_dict(model.state_dict())
    compiled = kc.compile(model, strict=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(4, 8)
            compiled(x).sum().backward()
            ref(x).sum().backward()
    ws = [w for w in rec if issubclass(w.category, KunlunCompileWarning)]
    assert len(ws) == 1 and "gradients" in str(ws[0].message)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6)
    assert compiled.kunlun_backend.report.graphs[0].mode == "eager-grad"


def test_no_grad_compiles_for_inference():
    model = torch.nn.Linear(8, 8)
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        compiled(torch.randn(2, 8))
    assert compiled.kunlun_backend.report.graphs[0].mode == "inference"
