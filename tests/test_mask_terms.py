"""Attention masks read as conjunctions of index-grid terms (`passes/rules/mask_terms.py`) -> one
`kunlun::attention_mask`: HF transformers' own masks (padding, sliding window) at its newest release with default
settings, and masks written here in other spellings.  Masks are compared with eager to the bit (bool, or the
additive float mask); models by their logits."""
import pytest
import torch
from torch import nn

from kunlun_compile.triton_kernel import cpu_kernels

from .conftest import compiled_and_eager, rel_err

transformers = pytest.importorskip("transformers")
ATTENTION_MASK = torch.ops.kunlun.attention_mask.default


def _compile(model, *inputs, kernels=False):
    torch._dynamo.reset()
    with cpu_kernels(kernels):
        got, want, report, misses = compiled_and_eager(model, *inputs)
    graph = report.graphs[0]
    code = next(p for p in graph.passes if p.name == "attention_mask").code_after
    return got, want, graph.patterns["attention_mask"], misses, code


# ---- HF transformers, default settings, a padded batch ---------------------------------------------------

def _hf(name: str, **options):
    cfg_cls, model_cls = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                          "mistral": ("MistralConfig", "MistralForCausalLM")}[name]
    config = getattr(transformers, cfg_cls)(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             intermediate_size=128, max_position_embeddings=128, **options)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask):
        return self.model(input_ids=ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("name, options, masks", [("qwen3", {}, 1), ("mistral", {"sliding_window": 4}, 1)],
                         ids=["causal+padding", "sliding-window+padding"])
def test_hf_padded_masks_are_one_kernel(name, options, masks):
    """A left-padded batch: HF builds `new_ones & (kv <= q) [& (kv > q - w)] & pad[b, kv]` over broadcast aranges,
    then `where(mask, 0, min)`; the whole is one kunlun::attention_mask writing the additive mask."""
    model = Logits(_hf(name, **options))
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :4] = 0
    got, want, fused, misses, code = _compile(model, ids, padding)
    assert fused == masks, misses
    assert "kunlun.attention_mask" in code and "aten.le" not in code and "aten.where" not in code
    keep = padding.bool()  # padded queries' rows are fully masked: eager's logits there are what they are
    assert rel_err(got[keep], want[keep]) < 1e-5


def test_hf_sliding_window_decode_step_mask_is_one_kernel():
    """A decode step with a KV cache (one query, the prefill's keys + 1): the sliding-window mask Mistral builds
    every step has a q dim of size 1; it is still one kernel, and the logits are eager's."""
    import copy

    import kunlun_compile as kc

    model = _hf("mistral", sliding_window=4)
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    step = torch.randint(3, 256, (1, 1), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        want = model(step, past_key_values=copy.deepcopy(cache), use_cache=True).logits
        compiled = kc.compile(model, strict=True)
        got = compiled(step, past_key_values=cache, use_cache=True).logits
    graph = compiled.kunlun_backend.report.graphs[0]
    assert graph.patterns["attention_mask"] == 1, [m for p in graph.passes for m in p.near_misses]
    assert rel_err(got, want) < 1e-5


# ---- masks written here -----------------------------------------------------------------------------------

class ReversedCausalWithPaddingView(nn.Module):
    """`q >= kv` (the comparison the other way round), padding by a broadcast view, a bool mask."""

    def forward(self, positions, key_valid):
        allowed = positions[:, None] >= positions[None, :]
        return allowed[None, None] & key_valid[:, None, None, :]


class WindowFromCachePositions(nn.Module):
    """Decode-style: q positions come in (a cache position per new token), kv positions are arange over the
    cache; `q - kv < w` written as `kv > q - w`, causal `kv <= q`, additive by where(m, 0, -inf)."""

    def forward(self, cache_position, scores):
        kv = torch.arange(scores.shape[-1], device=scores.device)
        q = cache_position.view(-1, 1)
        allowed = (kv.view(1, -1) > q - 3) & (kv.view(1, -1) <= q)
        return scores + torch.where(allowed, 0.0, float("-inf"))


class ShiftedCausal(nn.Module):
    """Queries that may also see one key ahead (`kv <= q + 1`) within a window of 3 behind (`kv > q - 3`, so the
    kernel's window is 4 from the shifted keys), with padding read at the kv positions."""

    def forward(self, pad, scores):
        kv, q = torch.arange(scores.shape[-1], device=pad.device), torch.arange(scores.shape[-2], device=pad.device)
        b = torch.arange(pad.shape[0], device=pad.device)
        kv4, q4 = kv[None, None, None, :], q[None, None, :, None]
        allowed = (kv4 <= q4 + 1) & (kv4 > q4 - 3) & pad[b[:, None, None, None], kv4]
        return torch.where(allowed, 0.0, torch.finfo(scores.dtype).min) + scores


class NotAffine(nn.Module):
    """`2 * kv <= q`: not a causal, window or padding term; the mask is left as written, with a near miss."""

    def forward(self, positions):
        return (2 * positions[None, :] <= positions[:, None]) & (positions[None, :] < positions[:, None] + 5)


class OneQueryCausal(nn.Module):
    """A decode step: one query position against the keys', `q >= kv` laid out by indexing with None.  The q dim
    has size 1 (with one key, every dim does): only the unsqueezes say which grid runs along which dim."""

    def forward(self, q_pos, kv_pos):
        return q_pos[:, None] >= kv_pos[None, :]


def _pad(batch, keys, gen):
    valid = torch.rand(batch, keys, generator=gen) > 0.3
    valid[:, 0] = True
    return valid


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "triton"])
def test_handwritten_masks_fuse_and_are_eager_to_the_bit(kernels):
    if kernels:
        pytest.importorskip("triton")
        from kunlun_compile.ops import interpreter_usable
        if not interpreter_usable():
            pytest.skip("needs TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(4)
    positions = torch.arange(5, 12)
    cases = [(ReversedCausalWithPaddingView(), (positions, _pad(2, 7, gen))),
             (WindowFromCachePositions(), (torch.tensor([6, 7]), torch.randn(2, 9, generator=gen))),
             (ShiftedCausal(), (_pad(3, 6, gen), torch.randn(3, 2, 5, 6, generator=gen))),
             # one query (a decode step): sizes alone cannot tell the q grid from the kv grid
             (WindowFromCachePositions(), (torch.tensor([6]), torch.randn(1, 9, generator=gen))),
             (OneQueryCausal(), (torch.tensor([5]), torch.arange(9))),
             (OneQueryCausal(), (torch.tensor([5]), torch.tensor([3]))),  # one key too: allowed
             (OneQueryCausal(), (torch.tensor([5]), torch.tensor([7])))]  # not allowed (swapped grids: allowed)
    for model, inputs in cases:
        got, want, fused, misses, code = _compile(model, *inputs, kernels=kernels)
        assert fused == 1, (type(model).__name__, misses)
        assert "kunlun.attention_mask" in code and "aten.le" not in code and "aten.ge" not in code, code
        assert got.dtype == want.dtype and torch.equal(got, want), type(model).__name__


def test_a_term_that_is_not_understood_leaves_the_mask_with_a_near_miss():
    got, want, fused, misses, _ = _compile(NotAffine(), torch.arange(3, 9))
    assert fused == 0 and torch.equal(got, want)
    lines = [line for line in misses if line.startswith("attention_mask: ")]
    assert len(lines) == 1 and "not a 1-D integer index" in lines[0], misses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masks_on_the_gpu_are_eager_to_the_bit():
    gen = torch.Generator().manual_seed(6)
    cases = [(ReversedCausalWithPaddingView(), (torch.arange(100, 400), _pad(4, 300, gen))),
             (WindowFromCachePositions(), (torch.arange(500, 516), torch.randn(16, 700, generator=gen))),
             (ShiftedCausal(), (_pad(2, 257, gen), torch.randn(2, 4, 129, 257, generator=gen).bfloat16())),
             (OneQueryCausal(), (torch.tensor([700]), torch.arange(1000)))]
    for model, inputs in cases:
        got, want, fused, misses, _ = _compile(model, *(t.cuda() for t in inputs))
        assert fused == 1, (type(model).__name__, misses)
        assert got.dtype == want.dtype and torch.equal(got, want), type(model).__name__
    model = Logits(_hf("mistral", sliding_window=4)).cuda()
    ids = torch.randint(3, 256, (2, 33), generator=gen).cuda()
    padding = torch.ones(2, 33, dtype=torch.long, device="cuda")
    padding[0, :5] = 0
    got, want, fused, misses, _ = _compile(model, ids, padding)
    assert fused == 1, misses
    keep = padding.bool()
    assert rel_err(got[keep], want[keep]) < 1e-5
