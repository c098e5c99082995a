"""Why does a fuzzer seed diverge from eager?  For each call of the seed's schedule and each graph mode:
the compiled output's error against eager, against a float64 copy of the model, eager's own error
against float64, and the mode's distance from mode `none` (same kernels, no graph runtime).  For the
MoE layers: the router's top-k margin (k-th minus (k+1)-th probability, from eager's own layer input)
at the rows that diverge most, and whether float64 picks other experts than eager there.

    python benchmarks/fuzz_diagnose.py SEED[,SEED...] [--device cuda] [--modes none,full]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import runtime_fuzz as rf  # noqa: E402 - the fuzzer lives with the tests


def _rows(t: torch.Tensor, tokens: int) -> torch.Tensor:
    return t.detach().double().reshape(tokens, -1)  # one row per token, whatever view the model returns


def _router_inputs(model: torch.nn.Module, args) -> List[torch.Tensor]:
    """Each MoE layer's input rows in one eager call."""
    seen: List[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for m in model.modules() if isinstance(m, rf.MoE)]
    with torch.no_grad():
        model(*args)
    for h in hooks:
        h.remove()
    return seen


def _margins(moe: rf.MoE, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Top-k margin per row, routed from eager's bf16 input in fp32 (eager's own arithmetic) and in float64."""
    p32 = torch.nn.functional.linear(x, moe.router).float().softmax(-1)
    p64 = torch.nn.functional.linear(x.double(), moe.router.double()).softmax(-1)
    top = p32.topk(moe.k + 1 if moe.k < moe.e else moe.k, dim=-1)
    margin = (top.values[:, moe.k - 1] - top.values[:, moe.k]) if moe.k < moe.e else torch.full_like(p32[:, 0], 1.0)
    ids32 = p32.topk(moe.k, dim=-1).indices.sort(-1).values
    ids64 = p64.topk(moe.k, dim=-1).indices.sort(-1).values
    return dict(margin=margin, flipped=(ids32 != ids64).any(-1))


def diagnose(seed: int, device: str, modes: List[str]) -> None:
    case = rf.generate(seed, device=device, dtype=torch.bfloat16)
    print(f"seed {seed}: {case.spec.short()}; sizes {case.schedule}")
    torch._dynamo.reset()
    with rf._op_references(device), rf._dynamo_settings(case), rf.deterministic_torch(device):
        eager = case.build()
        model64 = rf.Reference._float64_copy(case)
        switch = rf.ModeSwitch(modes, rf.CAPTURE_SIZES)
        model = case.build()
        compiled = rf._shared_compile(case, model, switch)
        outs: Dict[str, list] = {}
        for mode in modes:
            switch.mode = mode
            rf._reset_buffers(model, case.build())
            outs[mode] = []
            for call in range(len(case.schedule)):
                with torch.no_grad():
                    outs[mode].append(torch.utils._pytree.tree_leaves(compiled(*case.inputs(call)))[0])
        # the first mode once more: a distance from its own first run is nondeterminism (atomics), not a mode
        switch.mode = modes[0]
        rf._reset_buffers(model, case.build())
        again = []
        for call in range(len(case.schedule)):
            with torch.no_grad():
                again.append(torch.utils._pytree.tree_leaves(compiled(*case.inputs(call)))[0])
        rf._reset_buffers(model, case.build())
        moes = [m for m in eager.modules() if isinstance(m, rf.MoE)]
        print(f"{'call':>4} {'size':>4} {'eager~f64':>9} " +
              " ".join(f"{m[:6] + '~eager':>12} {m[:6] + '~f64':>10} {m[:6] + '~none':>11}" for m in modes) +
              f" {modes[0][:6] + ' again':>12}")
        for call in range(len(case.schedule)):
            args = case.inputs(call)
            with torch.no_grad():
                want = torch.utils._pytree.tree_leaves(eager(*args))[0]
                args64 = torch.utils._pytree.tree_map(
                    lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, args)
                truth = torch.utils._pytree.tree_leaves(model64(*args64))[0]
            cells = [f"{call:>4} {case.schedule[call]:>4} {rf.rel_error(want.double(), truth):9.2e}"]
            worst_mode, worst = None, 0.0
            for m in modes:
                got = outs[m][call]
                e_eager = rf.rel_error(got, want)
                cells.append(f"{e_eager:12.2e} {rf.rel_error(got.double(), truth):10.2e} "
                             f"{rf.rel_error(got, outs[modes[0]][call]):11.2e}")
                if e_eager > worst:
                    worst_mode, worst = m, e_eager
            cells.append(f"{rf.rel_error(again[call], outs[modes[0]][call]):12.2e}")
            print(" ".join(cells))
            if moes and max(worst, rf.rel_error(want.double(), truth)) > rf.BF16_TOL * 0.5:
                _explain_rows(outs[worst_mode or modes[0]][call], want, truth, moes,
                              _router_inputs(eager, case.inputs(call)))
    torch._dynamo.reset()


def _explain_rows(got, want, truth, moes, inputs) -> None:
    tokens = inputs[0].shape[0]
    g, w, t = _rows(got, tokens), _rows(want, tokens), _rows(truth, tokens)
    scale = w.norm().clamp_min(1e-30)
    vs_eager, eager_vs_f64 = (g - w).norm(dim=-1) / scale, (w - t).norm(dim=-1) / scale
    order = (vs_eager + eager_vs_f64).argsort(descending=True)[:4].tolist()
    per_layer = [_margins(moe, x) for moe, x in zip(moes, inputs)]
    all_margins = torch.stack([p["margin"] for p in per_layer]).min(0).values
    print(f"     rows' top-k margin (min over {len(moes)} MoE layers): median {all_margins.median().item():.2e}")
    for r in order:
        flips = [i for i, p in enumerate(per_layer) if p["flipped"][r]]
        print(f"     row {r:>3}: err vs eager {vs_eager[r].item():.1e}, eager vs f64 "
              f"{eager_vs_f64[r].item():.1e}; margins by layer "
              f"{[round(p['margin'][r].item(), 4) for p in per_layer]}; eager's fp32 routing != float64's "
              f"in layers {flips or 'none'}; row err vs f64: compiled {_row_err(g[r], t[r]):.2e}, "
              f"eager {_row_err(w[r], t[r]):.2e}")


def _row_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("seeds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default="none,piecewise,full")
    a = p.parse_args()
    for seed in rf.parse_seeds(a.seeds):
        diagnose(seed, a.device, a.modes.split(","))


if __name__ == "__main__":
    main()
