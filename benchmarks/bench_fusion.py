"""Model layers compiled with the kunlun backend vs inductor vs eager, on the GPU.

For each built-in model, for HF transformers Llama, Qwen3, Qwen3-MoE, Mixtral, Phi3, Gemma3, Glm, Dots1, Llama4
(one decoder layer at serving-like sizes, bf16), for Qwen3 on a left-padded batch (its mask built in the graph)
and for a hand-written sorted-dispatch MoE block over torch._grouped_mm, prints and saves: CUDA kernels
launched per call (counted with the profiler, the same way for all four variants), fused-op matches, and
time per call (CUDA-graph replay of one forward, median), as ratios to inductor;
and a plot of both.  Variants: eager, inductor, kunlun, and kunlun with every fusion pass off
(`fusion=False`, the CLI's --no-fusion: the generic lowering alone, with the ATen ops it leaves).

    python benchmarks/bench_fusion.py [OUT_DIR] [TOKENS] [MODELS]   -> fusion_layers.json, .png
                            (fusion_layers_t{TOKENS}.* unless 128 tokens; MODELS: a comma list, default all)

BENCH_FUSE_DENSE=1 compiles the kunlun variant with Llama4's dense top-1 experts fused at every token count
(`moe_experts.fusing_dense_experts()`; by default they fuse only at small static token counts).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys

import torch
import triton

import kunlun_compile as kc
from kunlun_compile.models import build_model, builtin_names
from kunlun_compile.passes.rules.moe_experts import fusing_dense_experts

SIZES = dict(num_hidden_layers=1, vocab_size=8192, hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128,
             intermediate_size=6144, moe_intermediate_size=768, max_position_embeddings=8192)
MOE_SIZES = dict(num_experts=32, num_experts_per_tok=8)


def overrides(name):
    o = dict(SIZES)
    if name in ("qwen3-next-tiny",):
        o.update(head_dim=256, rotary_dim=64, num_heads=8, num_kv_heads=2)
    if "moe" in name or "next" in name or "deepseek" in name:
        o.update(MOE_SIZES)
        if "deepseek" in name:
            o.update(n_group=8, topk_group=4)  # 4 experts per group
    return o


class HFLogits(torch.nn.Module):
    """An HF causal LM called the way a serving loop calls it: ids in, logits out, no KV cache object."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


class HFPadded(HFLogits):
    """The same with a left-padded batch of two: HF builds its causal + padding mask in the graph."""

    def forward(self, ids, attention_mask):
        return self.model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits


class SortedGroupedMoE(torch.nn.Module):
    """An MoE block written by hand the way decode stacks write it (no HF, no vLLM): softmax top-k router,
    argsort of the ids, histc counts, torch._grouped_mm against [E, K, N] weights, index_add_ back."""

    def __init__(self, hidden, inter, experts, top_k, device, dtype):
        super().__init__()
        self.top_k = top_k
        self.router = torch.nn.Parameter(torch.randn(experts, hidden, device=device, dtype=dtype) / hidden ** 0.5)
        self.gate_up = torch.nn.Parameter(torch.randn(experts, hidden, 2 * inter, device=device, dtype=dtype)
                                          / hidden ** 0.5)
        self.down = torch.nn.Parameter(torch.randn(experts, inter, hidden, device=device, dtype=dtype) / inter ** 0.5)

    def forward(self, x):
        probs = torch.nn.functional.linear(x, self.router).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        experts = self.gate_up.shape[0]
        offs = torch.histc(flat.float(), bins=experts, min=0, max=experts - 1).cumsum(0).to(torch.int32)
        source = order // self.top_k
        gate, up = torch._grouped_mm(x[source], self.gate_up, offs=offs).chunk(2, dim=-1)
        out = torch._grouped_mm(torch.nn.functional.silu(gate) * up, self.down, offs=offs)
        out = out * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, source, out)


def handwritten_layer(kind: str, tokens: int, device="cuda", dtype=torch.bfloat16):
    torch.manual_seed(0)
    if kind == "sorted-moe":
        model = SortedGroupedMoE(SIZES["hidden_size"], SIZES["moe_intermediate_size"], MOE_SIZES["num_experts"],
                                 MOE_SIZES["num_experts_per_tok"], device, dtype).eval().requires_grad_(False)
        return model, (torch.randn(tokens, SIZES["hidden_size"], device=device, dtype=dtype),)
    model, (ids,) = hf_layer("hf-qwen3", tokens, device, dtype)  # "hf-qwen3-padded"
    ids = ids.expand(2, tokens).contiguous()
    padding = torch.ones(2, tokens, dtype=torch.long, device=device)
    padding[1, :tokens // 4] = 0
    return HFPadded(model.model), (ids, padding)


VARIANTS = ("eager", "inductor", "kunlun", "kunlun_nofusion")
HF_KINDS = ("hf-llama", "hf-qwen3", "hf-qwen3-moe", "hf-mixtral", "hf-phi3", "hf-gemma3", "hf-glm", "hf-dots1",
            "hf-llama4", "hf-gpt-oss")
HANDWRITTEN_KINDS = ("sorted-moe", "hf-qwen3-padded")


def hf_layer(kind: str, tokens: int, device="cuda", dtype=torch.bfloat16):
    import transformers

    common = dict(vocab_size=SIZES["vocab_size"], hidden_size=SIZES["hidden_size"],
                  intermediate_size=SIZES["intermediate_size"], num_hidden_layers=1,
                  num_attention_heads=SIZES["num_heads"], num_key_value_heads=SIZES["num_kv_heads"],
                  head_dim=SIZES["head_dim"], max_position_embeddings=SIZES["max_position_embeddings"])
    moe = dict(common, num_experts_per_tok=MOE_SIZES["num_experts_per_tok"])
    builders = {
        "hf-llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)),
        "hf-qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common)),
        # corpus architectures that fuse since the HF-corpus rules (default settings: grouped_mm experts)
        "hf-qwen3-moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **moe, num_experts=MOE_SIZES["num_experts"], moe_intermediate_size=SIZES["moe_intermediate_size"],
            decoder_sparse_step=1)),
        "hf-mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **dict(moe, intermediate_size=SIZES["moe_intermediate_size"]), num_local_experts=MOE_SIZES["num_experts"])),
        "hf-phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **{k: v for k, v in common.items() if k != "head_dim"}, pad_token_id=0)),
        "hf-gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**common)),
        # corpus architectures fused since the corpus: Glm's interleaved partial rotary (pairs), Dots1's
        # one-group sigmoid router with bias, without renormalisation
        "hf-glm": lambda: transformers.GlmForCausalLM(transformers.GlmConfig(**common, pad_token_id=0)),
        "hf-dots1": lambda: transformers.Dots1ForCausalLM(transformers.Dots1Config(
            **moe, n_routed_experts=MOE_SIZES["num_experts"], moe_intermediate_size=SIZES["moe_intermediate_size"],
            n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1, pad_token_id=0)),
        # corpus architecture whose router fuses since the router primitive: top-1 of the logits scattered into
        # -inf, a sigmoid over all experts (its experts are dense bmm, its rotary complex: neither fuses)
        "hf-llama4": lambda: transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
            **dict(moe, num_experts_per_tok=1, intermediate_size=SIZES["moe_intermediate_size"]),
            num_local_experts=MOE_SIZES["num_experts"], intermediate_size_mlp=SIZES["intermediate_size"],
            pad_token_id=0)),
        # corpus architecture whose experts fuse since the swigluoai activation: biases, clamped interleaved SwiGLU
        "hf-gpt-oss": lambda: transformers.GptOssForCausalLM(transformers.GptOssConfig(
            **dict(moe, intermediate_size=SIZES["moe_intermediate_size"]), num_local_experts=MOE_SIZES["num_experts"],
            pad_token_id=0)),
    }
    torch.manual_seed(0)
    model = builders[kind]()
    model = HFLogits(model.to(device, dtype).eval().requires_grad_(False))
    return model, (torch.randint(0, SIZES["vocab_size"], (1, tokens), device=device),)


def cases(tokens: int):
    for name in builtin_names():
        yield name, lambda name=name: build_model(name, dtype=torch.bfloat16, device="cuda", num_tokens=tokens,
                                                  seed=0, **overrides(name))
    for kind in HF_KINDS:
        yield kind, lambda kind=kind: hf_layer(kind, tokens)
    # forms fused since the expert-dispatch primitive and the mask recogniser
    for kind in HANDWRITTEN_KINDS:
        yield kind, lambda kind=kind: handwritten_layer(kind, tokens)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    xs = range(len(rows))
    fig, (ax_t, ax_k) = plt.subplots(1, 2, figsize=(13, 4))
    labels = [v for v in VARIANTS if f"{v}_ms" in rows[0]]
    w = 0.8 / len(labels)
    for i, label in enumerate(labels):
        dx = (i - (len(labels) - 1) / 2) * w
        ax_t.bar([x + dx for x in xs], [r[f"{label}_ms"] / r["inductor_ms"] for r in rows], w, label=label)
        ax_k.bar([x + dx for x in xs], [r[f"{label}_cuda_kernels"] for r in rows], w, label=label)
    ax_t.set_ylabel("time / inductor (CUDA-graph replay)")
    ax_t.axhline(1.0, color="gray", lw=0.8)
    ax_k.set_ylabel("CUDA kernels per call")
    for ax in (ax_t, ax_k):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    tokens = rows[0]["tokens"]
    fig.suptitle(f"one decoder layer, bf16, {tokens} tokens, {torch.cuda.get_device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def kernels_per_call(fn, args) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def graph_time_ms(fn, args, reps=50) -> float:
    """Median time of one call, replayed as a CUDA graph (no host dispatch in the number).  A spin kernel
    before each sample keeps the GPU busy while the host enqueues the events and the replay, so the
    number is the graph's time on the GPU, not the host's launch delay (~9-15 µs on the H200 hosts)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*args)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(200_000)  # ~0.1 ms of GPU work: covers the host's enqueueing below
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128  # the eager MoE gathers [T, k, 2I, H] weights
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    rows = []
    os.makedirs(out_dir, exist_ok=True)
    stem = (("fusion_layers" if tokens == 128 else f"fusion_layers_t{tokens}") + ("_some" if only else "")
            + ("_fuse_dense" if os.environ.get("BENCH_FUSE_DENSE") == "1" else ""))

    def save(rows):
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "sizes": SIZES, "moe_sizes": MOE_SIZES, "rows": rows}
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
            json.dump(result, f, indent=1)

    for name, build in cases(tokens):
        if only and name not in only:
            continue
        torch._dynamo.reset()
        model, inputs = build()
        with torch.no_grad():
            kun = kc.compile(model, strict=True, graph_mode="none")  # this bench captures the whole call itself
            generic = kc.compile(model, strict=True, graph_mode="none", fusion=False)
            ind = torch.compile(model, backend="inductor")
            want = model(*inputs)
            with fusing_dense_experts(True) if os.environ.get("BENCH_FUSE_DENSE") == "1" else contextlib.nullcontext():
                got_k = kun(*inputs)  # compiles here
            got_i = ind(*inputs)
            err_k = ((got_k.float() - want.float()).norm() / want.float().norm()).item()
            err_i = ((got_i.float() - want.float()).norm() / want.float().norm()).item()
            got_g = generic(*inputs)
            err_g = ((got_g.float() - want.float()).norm() / want.float().norm()).item()
            row = {"model": name, "tokens": tokens,
                   "rel_err_vs_eager": {"kunlun": err_k, "inductor": err_i, "kunlun_nofusion": err_g}}
            g = kun.kunlun_backend.report.graphs[0]
            row["patterns"] = {k: v for k, v in g.patterns.items() if v}
            row["graph_kernels"] = {"before": sum(g.kernels_before.values()), "after": dict(g.kernels)}
            row["nofusion_graph_kernels"] = [dict(gg.kernels) for gg in generic.kunlun_backend.report.graphs]
            for label, fn in (("eager", model), ("inductor", ind), ("kunlun", kun), ("kunlun_nofusion", generic)):
                row[f"{label}_cuda_kernels"] = kernels_per_call(fn, inputs)
                row[f"{label}_ms"] = graph_time_ms(fn, inputs)
        row["kunlun_vs_inductor"] = row["kunlun_ms"] / row["inductor_ms"]
        row["kunlun_vs_eager"] = row["kunlun_ms"] / row["eager_ms"]
        row["kunlun_nofusion_vs_inductor"] = row["kunlun_nofusion_ms"] / row["inductor_ms"]
        rows.append(row)
        print(f"{name:18} kernels eager {row['eager_cuda_kernels']:4d} inductor {row['inductor_cuda_kernels']:4d} "
              f"kunlun {row['kunlun_cuda_kernels']:4d} | ms eager {row['eager_ms']:.3f} inductor "
              f"{row['inductor_ms']:.3f} kunlun {row['kunlun_ms']:.3f} (x{row['kunlun_vs_inductor']:.2f} of "
              f"inductor) | no fusion: {row['kunlun_nofusion_cuda_kernels']:4d} kernels "
              f"{row['kunlun_nofusion_ms']:.3f} ms (x{row['kunlun_nofusion_vs_inductor']:.2f}) | "
              f"err {err_k:.1e}/{err_i:.1e}/{err_g:.1e} | "
              f"{row['patterns']}", flush=True)
        save(rows)  # after every row: a run cut short by its time limit keeps the rows it measured
    try:
        plot(rows, os.path.join(out_dir, f"{stem}.png"))
    except ImportError as e:
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
