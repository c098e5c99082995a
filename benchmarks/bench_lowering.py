"""The generic lowering alone (fusion passes off) vs inductor vs eager, on standalone subgraphs, on the GPU.

Each case is a plain-torch function of the kind a decoder layer is made of: RMSNorm (HF, Gemma and
x*x/sum spellings), residual add + RMSNorm, LayerNorm + GELU + residual, a scaled and masked fp32
softmax, log_softmax over a vocabulary row (the looped long-row path), a softmax/top-k router,
neox rotary, a scaled embedding, causal-mask construction, transformers' packed-sequence mask and its
MoE dispatch glue (histc, cumsum, inverse permutation, gathers); bf16, hidden 4096, at decode sizes
(1, 16, 64 tokens) and a prefill size (8192 tokens; log_softmax 1024, the masks 4096).  The
last three are mostly not lowered yet (indexing, cat): they show where the generic path stands.
Variants, one compile each (dynamo reset between): eager, inductor (torch.compile default) and
kunlun with fusion=False (graph runtime off: this bench captures the whole call itself).  Per row
and variant: CUDA kernels per call (counted with the profiler) and time per call (CUDA-graph replay,
median), as ratios to inductor; kunlun's generated/ATen kernel counts; and the max relative error
vs a float64 eager run of the same function on the same inputs (max|out-ref| / max|ref|; NaN marks
the variant failed).  Also the geometric mean of kunlun/inductor time, and a plot of both.

    python benchmarks/bench_lowering.py [OUT_DIR] [CASES]   -> lowering_<device>.json, .png and a table
    python benchmarks/bench_lowering.py --smoke [CASES]      -> every case at 2 tokens, hidden 64, vocab 512,
                                                                on the CPU: eager vs kunlun errors, no timing

CASES is a comma list of case names (default: all).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys

import torch
from torch.overrides import TorchFunctionMode

F = torch.nn.functional
BF = torch.bfloat16
EPS = 1e-6
TOP_K = 8
SIZES = dict(hidden=4096, vocab=32000, heads=32, head_dim=128, score_rows_per_token=8, score_cols=1024,
             experts=64, mask_past=1024)
SMOKE_SIZES = dict(hidden=64, vocab=512, heads=4, head_dim=16, score_rows_per_token=8, score_cols=64,
                   experts=64, mask_past=8)
DECODE_TOKENS = (1, 16, 64)
PREFILL_TOKENS = 8192
PREFILL_OVERRIDE = {"log_softmax_vocab": 1024, "causal_mask": 4096, "packed_mask": 4096}  # bounds memory
SMOKE_TOKENS = 2
SMOKE_TOLERANCE = 2  # --smoke fails a case whose kunlun error passes this many times eager's (+ 2^-8)
# graph_mode="none": this bench captures the whole call in a CUDA graph itself (as bench_fusion.py does)
KUNLUN_OPTIONS = dict(fusion=False, graph_mode="none", strict=True)
VARIANTS = ("eager", "inductor", "kunlun")


# ---- the subgraphs, in plain PyTorch -------------------------------------------------------

def rmsnorm_hf(x, w):
    xf = x.float()
    v = xf.pow(2).mean(-1, keepdim=True)
    return (xf * torch.rsqrt(v + EPS)).to(x.dtype) * w


def rmsnorm_gemma(x, w):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return (y * (1.0 + w.float())).type_as(x)


def rmsnorm_gemma_sum(x, w):
    xf = x.float()
    v = (xf * xf).sum(-1, keepdim=True) / x.shape[-1]
    return (xf * torch.rsqrt(v + EPS) * (1.0 + w.float())).to(x.dtype)


def add_rmsnorm(x, residual, w):
    h = x + residual
    return h, rmsnorm_hf(h, w)


def layernorm_gelu_residual(x, w, b):
    return x + F.gelu(F.layer_norm(x, (x.shape[-1],), w, b, 1e-5))


def masked_softmax(s, mask):
    scale = 1.0 / math.sqrt(128)
    return torch.softmax(s.float() * scale + mask, -1).to(torch.bfloat16)


def log_softmax_vocab(logits):
    return torch.log_softmax(logits.float(), -1)


def router(logits):
    p = torch.softmax(logits.float(), -1)
    w, ids = torch.topk(p, TOP_K)
    return (w / w.sum(-1, keepdim=True)).to(logits.dtype), ids


def rotate_half(x):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), -1)


def rotary_neox(q, cos, sin):
    return q * cos + rotate_half(q) * sin


def embedding_scaled(ids, table):
    return F.embedding(ids, table) * math.sqrt(table.shape[1])


def causal_mask(q_pos, k_pos):
    return torch.where(k_pos[None, :] <= q_pos[:, None], 0.0, float("-inf"))


def packed_mask(pos, pm):
    """transformers' causal mask for a call with ids only: sequence starts found by a cumsum of position jumps,
    `padding_mask[batch, kv]` picks, `arange`s."""
    seq = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)  # its find_packed_sequence_indices
    q = torch.arange(pos.shape[1], device=pos.device)[:, None]
    k = torch.arange(pos.shape[1], device=pos.device)[None, :]
    b = torch.arange(pos.shape[0], device=pos.device)[:, None, None]
    return (k <= q) & pm[b, k] & (seq[b, q] == seq[b, k])


def moe_dispatch(ids, x):
    """transformers' grouped-GEMM dispatch around the expert GEMMs: sort by expert (generated ranks up to
    lowering/small_sorts.MAX_RANKED elements, ATen's sort beyond), tokens per expert (histc) and their offsets
    (cumsum), rows in expert order, the inverse permutation written into a fresh tensor and the gather back."""
    k = ids.shape[-1]
    sorted_ids, perm = torch.sort(ids.reshape(-1))
    experts = SIZES["experts"]  # the smoke sizes have as many
    counts = torch.histc(sorted_ids.float(), bins=experts, min=0, max=experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=ids.device)
    rows = x[perm // k] * 2.0
    return offsets, rows[inv]


# ---- fresh random inputs (never zeros) -----------------------------------------------------

def _randn(dev, *shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=dev) * scale + shift).to(BF)


def _norm_inputs(T, S, dev):
    return _randn(dev, T, S["hidden"], scale=2.0), _randn(dev, S["hidden"], scale=0.1, shift=1.0)


def _gemma_inputs(T, S, dev):
    return _randn(dev, T, S["hidden"], scale=2.0), _randn(dev, S["hidden"], scale=0.1)


def _add_norm_inputs(T, S, dev):
    x, w = _norm_inputs(T, S, dev)
    return x, _randn(dev, T, S["hidden"]), w


def _layernorm_inputs(T, S, dev):
    H = S["hidden"]
    return _randn(dev, T, H, scale=2.0, shift=0.5), _randn(dev, H, scale=0.1, shift=1.0), _randn(dev, H, scale=0.1)


def _softmax_inputs(T, S, dev):
    cols = S["score_cols"]
    s = _randn(dev, T * S["score_rows_per_token"], cols, scale=math.sqrt(128))
    mask = torch.randn(1, cols, device=dev) * 0.5
    mask = mask.masked_fill(torch.rand(1, cols, device=dev) < 0.25, float("-inf"))
    mask[:, 0] = 0.5  # no row fully masked
    return s, mask.to(BF)


def _vocab_inputs(T, S, dev):
    return (_randn(dev, T, S["vocab"], scale=3.0),)


def _router_inputs(T, S, dev):
    # a random permutation per row, in steps of 1/16 (exact in bf16): no ties, so top-k ids are well defined
    perm = torch.argsort(torch.rand(T, S["experts"], device=dev), -1)
    return ((perm.float() - (S["experts"] - 1) / 2) / 16).to(BF),


def _rotary_inputs(T, S, dev):
    D = S["head_dim"]
    pos = torch.randint(0, 4096, (T,), device=dev).float()
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, D, 2, device=dev).float() / D)
    emb = torch.cat((pos[:, None] * inv_freq, pos[:, None] * inv_freq), -1)[:, None, :]
    return _randn(dev, T, S["heads"], D), emb.cos().to(BF), emb.sin().to(BF)


def _embedding_inputs(T, S, dev):
    return torch.randint(0, S["vocab"], (T,), device=dev), _randn(dev, S["vocab"], S["hidden"])


def _packed_inputs(T, S, dev):
    cut = int(torch.randint(1, T, ()).item()) if T > 1 else 1  # two packed sequences
    pos = torch.cat([torch.arange(cut), torch.arange(T - cut)]).to(dev)[None]
    return pos, torch.rand(1, T, device=dev) > 0.05


def _dispatch_inputs(T, S, dev):
    return torch.randint(0, S["experts"], (T, TOP_K), device=dev), _randn(dev, T, S["hidden"]).to(BF)


def _mask_inputs(T, S, dev):
    # T new tokens after S["mask_past"] cached ones, positions shifted by a random offset
    start = int(torch.randint(1, 64, ()).item())
    past = S["mask_past"]
    return (torch.arange(T, device=dev) + past + start, torch.arange(past + T, device=dev) + start)


# name -> (function, inputs(T, sizes, device))
CASES = {
    "rmsnorm_hf": (rmsnorm_hf, _norm_inputs),
    "rmsnorm_gemma": (rmsnorm_gemma, _gemma_inputs),
    "rmsnorm_gemma_sum": (rmsnorm_gemma_sum, _gemma_inputs),
    "add_rmsnorm": (add_rmsnorm, _add_norm_inputs),
    "layernorm_gelu_residual": (layernorm_gelu_residual, _layernorm_inputs),
    "masked_softmax": (masked_softmax, _softmax_inputs),
    "log_softmax_vocab": (log_softmax_vocab, _vocab_inputs),
    "router_topk": (router, _router_inputs),
    "rotary_neox": (rotary_neox, _rotary_inputs),
    "embedding_scaled": (embedding_scaled, _embedding_inputs),
    "causal_mask": (causal_mask, _mask_inputs),
    "packed_mask": (packed_mask, _packed_inputs),
    "moe_dispatch": (moe_dispatch, _dispatch_inputs),
}


def token_counts(name):
    return DECODE_TOKENS + (PREFILL_OVERRIDE.get(name, PREFILL_TOKENS),)


# ---- float64 reference and errors ----------------------------------------------------------

def _f64(v):
    return torch.float64 if isinstance(v, torch.dtype) and v.is_floating_point else v


class Float64(TorchFunctionMode):
    """Every floating dtype a function asks for (`.float()`, `.to(torch.bfloat16)`, `dtype=`, the default
    dtype of Python scalars) becomes float64: a float64 eager run of a function written for bf16/fp32."""

    DOWNCASTS = (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16)

    def __enter__(self):
        self.default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.set_default_dtype(self.default)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.DOWNCASTS:
            return args[0].to(torch.float64)
        return func(*(_f64(a) for a in args), **{k: _f64(v) for k, v in (kwargs or {}).items()})


def outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def reference(fn, args):
    """fn run eagerly in float64 on the same inputs (floating inputs upcast, integer ones as they are)."""
    args64 = [a.to(torch.float64) if a.is_floating_point() else a for a in args]
    with torch.no_grad(), Float64():
        return outputs(fn(*args64))


def rel_err(got, ref) -> float:
    """max|got - ref| / max|ref| over all outputs.  NaN in an output: NaN.  Equal infinities count as
    equal (a mask's -inf); integer outputs (top-k ids) must be equal (else inf)."""
    worst = 0.0
    for g, r in zip(outputs(got), ref, strict=True):
        if g.shape != r.shape:
            return math.inf
        if not g.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(g.long(), r.long()) else math.inf)
            continue
        g, r = g.double(), r.double()
        if torch.isnan(g).any():
            return math.nan
        diff = torch.where(g == r, 0.0, (g - r).abs()).max().item() if g.numel() else 0.0
        if diff == 0.0:
            continue
        finite = r[torch.isfinite(r)].abs()
        scale = finite.max().item() if finite.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else math.inf)
    return worst


def _finite_or_none(x):
    return x if x is not None and math.isfinite(x) else None


# ---- variants ------------------------------------------------------------------------------

def variant(label, fn, kc):
    if label == "eager":
        return fn
    if label == "inductor":
        return torch.compile(fn)
    return kc.compile(fn, **KUNLUN_OPTIONS)


def lowered(compiled) -> dict:
    """What kunlun made of the function: kernels by kind after its passes, and any fallbacks."""
    graphs = compiled.kunlun_backend.report.graphs
    kinds = {}
    for g in graphs:
        for k, v in g.kernels.items():
            kinds[k] = kinds.get(k, 0) + v
    return {"graphs": len(graphs), "kernels": kinds,
            "fallbacks": [f"{f.stage}: {f.reason}" for g in graphs for f in g.fallbacks]}


def run_row(name, tokens, sizes, device, kc, labels, timing=None) -> dict:
    """One (case, tokens) row: each variant compiled after a dynamo reset, its error vs float64, and
    with `timing` = (kernels_per_call, graph_time_ms) its kernels and time.  A variant that raises
    records its error and the others still run."""
    fn, make = CASES[name]
    row = {"case": name, "tokens": tokens, "rel_err_vs_fp64": {}, "failed": []}
    try:
        torch.manual_seed(0)
        args = make(tokens, sizes, device)
        ref = reference(fn, args)
    except Exception as e:  # noqa: BLE001 - a case that cannot even be built is recorded, the run goes on
        row["error"] = f"inputs/reference: {type(e).__name__}: {str(e)[:300]}"
        row["failed"] = list(labels)
        return row
    for label in labels:
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                f = variant(label, fn, kc)
                err = rel_err(f(*args), ref)
                row["rel_err_vs_fp64"][label] = _finite_or_none(err)
                if not math.isfinite(err):
                    row["failed"].append(label)
                if label == "kunlun":
                    row["kunlun_lowered"] = lowered(f)
                if timing is not None:
                    kernels_per_call, graph_time_ms = timing
                    row[f"{label}_cuda_kernels"] = kernels_per_call(f, args)
                    row[f"{label}_ms"] = graph_time_ms(f, args)
        except Exception as e:  # noqa: BLE001 - whatever a compiler or a kernel raises: record it, go on
            row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if label not in row["failed"]:
                row["failed"].append(label)
    if "kunlun_ms" in row and "inductor_ms" in row:
        row["kunlun_vs_inductor"] = row["kunlun_ms"] / row["inductor_ms"]
    if "kunlun_cuda_kernels" in row and "inductor_cuda_kernels" in row:
        row["kunlun_minus_inductor_kernels"] = row["kunlun_cuda_kernels"] - row["inductor_cuda_kernels"]
    return row


# ---- printing ------------------------------------------------------------------------------

def _fmt(x, spec):
    """x formatted with spec, or a dash as wide when there is no number (a variant that failed)."""
    if isinstance(x, (int, float)):
        return format(x, spec)
    width = re.match(r"\+?(\d*)", spec).group(1)
    return format("-", f">{width}s")


def _lowered_cell(row):
    k = row.get("kunlun_lowered", {}).get("kernels", {})
    return f"{k.get('pointwise', 0)}/{k.get('aten', 0)}" if k else "-"


def _status(row):
    notes = [f"{v}: {row[f'{v}_error'][:70]}" for v in VARIANTS if f"{v}_error" in row]
    notes += [row["error"][:90]] if "error" in row else []
    notes += [f"{v} non-finite" for v in row["failed"] if f"{v}_error" not in row and "error" not in row]
    return "ok" if not notes else "FAILED " + "; ".join(notes)


TABLE_HEAD = (f"{'case':<24}{'T':>6} | {'eager ms':>9}{'ind ms':>9}{'kun ms':>9}{'kun/ind':>8} | "
              f"{'kern e':>7}{'i':>4}{'k':>4}{'k-i':>5} | {'pw/aten':>8} | {'err ind':>8}{'err kun':>8} | status")


def table_line(row):
    e = row["rel_err_vs_fp64"]
    return (f"{row['case']:<24}{row['tokens']:>6} | {_fmt(row.get('eager_ms'), '9.4f')}"
            f"{_fmt(row.get('inductor_ms'), '9.4f')}{_fmt(row.get('kunlun_ms'), '9.4f')}"
            f"{_fmt(row.get('kunlun_vs_inductor'), '8.2f')} | {_fmt(row.get('eager_cuda_kernels'), '7d')}"
            f"{_fmt(row.get('inductor_cuda_kernels'), '4d')}{_fmt(row.get('kunlun_cuda_kernels'), '4d')}"
            f"{_fmt(row.get('kunlun_minus_inductor_kernels'), '+5d')} | {_lowered_cell(row):>8} | "
            f"{_fmt(e.get('inductor'), '8.1e')}{_fmt(e.get('kunlun'), '8.1e')} | {_status(row)}")


SMOKE_HEAD = f"{'case':<24}{'T':>4} | {'err eager':>9}{'err kun':>9} | {'pw/aten':>8} | status"


def smoke_line(row):
    e = row["rel_err_vs_fp64"]
    return (f"{row['case']:<24}{row['tokens']:>4} | {_fmt(e.get('eager'), '9.1e')}{_fmt(e.get('kunlun'), '9.1e')}"
            f" | {_lowered_cell(row):>8} | {_status(row)}")


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# ---- plot ----------------------------------------------------------------------------------

def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['case']} T={r['tokens']}" for r in rows]
    xs = range(len(rows))
    fig, (ax_t, ax_k) = plt.subplots(2, 1, figsize=(max(13, 0.32 * len(rows)), 8), sharex=True)
    for i, label in enumerate(VARIANTS):
        ratios = [r[f"{label}_ms"] / r["inductor_ms"] if f"{label}_ms" in r and "inductor_ms" in r else math.nan
                  for r in rows]
        ax_t.bar([x + (i - 1) * 0.27 for x in xs], ratios, 0.27, label=label)
        ax_k.bar([x + (i - 1) * 0.27 for x in xs], [r.get(f"{label}_cuda_kernels", math.nan) for r in rows], 0.27,
                 label=label)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time / inductor (CUDA-graph replay)")
    ax_t.axhline(1.0, color="gray", lw=0.8)
    ax_k.set_ylabel("CUDA kernels per call")
    ax_k.set_xticks(list(xs))
    ax_k.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    for ax in (ax_t, ax_k):
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- entry points --------------------------------------------------------------------------

def device_tag(name: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,4})\b", name)
    return m.group(1).lower() if m else "gpu"


def _case_names(arg):
    if not arg:
        return list(CASES)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases are {list(CASES)}")
    return names


def smoke(names) -> int:
    """Every case at SMOKE_TOKENS tokens, small sizes, on the CPU (Triton interpreted): eager and kunlun vs
    float64, no timing; exit status 1 when a case raised, gave NaN or is off by more than SMOKE_TOLERANCE."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by dynamo or kunlun_compile)
    import kunlun_compile as kc

    torch._dynamo.config.recompile_limit = 64
    print(SMOKE_HEAD, flush=True)
    bad = 0
    for name in names:
        row = run_row(name, SMOKE_TOKENS, SMOKE_SIZES, "cpu", kc, ("eager", "kunlun"))
        e = row["rel_err_vs_fp64"]
        if not row["failed"] and e["kunlun"] > SMOKE_TOLERANCE * e["eager"] + 2 ** -8:
            row["failed"].append("kunlun")
            row["kunlun_error"] = f"error {e['kunlun']:.1e} > {SMOKE_TOLERANCE} x eager's + 2^-8"
        bad += bool(row["failed"])
        print(smoke_line(row), flush=True)
    print(f"{len(names) - bad}/{len(names)} cases ok", flush=True)
    return 1 if bad else 0


def main(out_dir, names) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton
    from bench_fusion import graph_time_ms, kernels_per_call

    import kunlun_compile as kc

    torch._dynamo.config.recompile_limit = 64
    device = torch.cuda.get_device_name()
    rows = []
    print(TABLE_HEAD, flush=True)
    for name in names:
        for tokens in token_counts(name):
            row = run_row(name, tokens, SIZES, "cuda", kc, VARIANTS, timing=(kernels_per_call, graph_time_ms))
            rows.append(row)
            print(table_line(row), flush=True)
            torch.cuda.empty_cache()
    counted = [r["kunlun_vs_inductor"] for r in rows
               if "kunlun_vs_inductor" in r and not {"kunlun", "inductor"} & set(r["failed"])]
    gm = geomean(counted)
    print(f"geomean kunlun/inductor time: {_fmt(gm, '.3f')} over {len(counted)} rows (both correct)", flush=True)
    result = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "sizes": SIZES,
              "kunlun_options": KUNLUN_OPTIONS, "geomean_kunlun_vs_inductor": gm, "geomean_rows": len(counted),
              "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    tag = device_tag(device)
    with open(os.path.join(out_dir, f"lowering_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        title = (f"generic lowering (kunlun, fusion off) vs inductor vs eager, bf16, {device}; "
                 f"geomean kunlun/inductor {_fmt(gm, '.2f')}")
        plot(rows, os.path.join(out_dir, f"lowering_{tag}.png"), title)
    except ImportError as e:
        print(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--smoke" in argv:
        rest = [a for a in argv if a != "--smoke"]
        sys.exit(smoke(_case_names(rest[0] if rest else None)))
    sys.exit(main(argv[0] if argv else "benchmarks/results", _case_names(argv[1] if len(argv) > 1 else None)))
