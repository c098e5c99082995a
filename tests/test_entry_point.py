"""The backend is found by name after pip install, without importing the package."""
import subprocess
import sys

SCRIPT = r"""
import sys, torch
assert "kunlun_compile" not in sys.modules
assert "kunlun" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8)).eval()
x = torch.randn(5, 8)
with torch.no_grad():
    got = torch.compile(m, backend="kunlun")(x)
    want = m(x)
# SiLU is lowered to a generated kernel; on the CPU its exp is torch's, not the fused SiLU kernel's
torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
import kunlun_compile
assert len(kunlun_compile.last_report().graphs) == 1
print("ok")
"""


def test_backend_by_name_without_import():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")
