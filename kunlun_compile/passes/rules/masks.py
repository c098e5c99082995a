"""masked_input and attention_mask: the index and mask arithmetic around embeddings and attention.

- masked_input: vLLM's `get_masked_input_and_mask` (vocab-parallel embedding)
  -> kunlun::masked_input.  The vocabulary bounds are integer constants read
  from the graph (markers below); `added_offset` is one folded constant there.
- attention_mask: a causal mask from positions, optionally limited to a
  sliding window and/or to valid keys (padding), as an additive float mask
  (`zeros.masked_fill(~allowed, -inf)`) or as the bool `allowed` itself
  -> kunlun::attention_mask.
"""
from __future__ import annotations

import itertools

import torch

from ..pattern_engine import Bindings, Refusal, Rewrite

aten = torch.ops.aten
# integer markers: distinct from each other and from any size or index used in tracing
_ORG_START, _ORG_END, _ADDED_START, _ADDED_END, _ADDED_OFFSET = 100003, 200003, 300007, 400009, 500009
_WINDOW = 600011


def get_masked_input_and_mask(input_, org_start, org_end, added_start, added_end, added_offset):
    org_vocab_mask = (input_ >= org_start) & (input_ < org_end)
    added_vocab_mask = (input_ >= added_start) & (input_ < added_end)
    valid_offset = (org_start * org_vocab_mask) + (added_offset * added_vocab_mask)
    vocab_mask = org_vocab_mask | added_vocab_mask
    input_ = vocab_mask * (input_ - valid_offset)
    return input_, ~vocab_mask


def _masked_input_guard(b: Bindings):
    ids = b.val("input_")
    values = {k: b.scalar(k) for k in ("org_start", "org_end", "added_start", "added_end", "added_offset")}
    bad = [k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        return Refusal(f"vocabulary bounds {bad} are not integer constants")
    if ids.dtype not in (torch.int32, torch.int64):
        return Refusal(f"token ids are {ids.dtype}, not int32/int64")
    padding = values["added_start"] - (values["org_end"] - values["org_start"]) - values["added_offset"]
    if padding < 0:
        return Refusal(f"the bounds imply a negative vocab padding ({padding})")
    return {"padding": padding}


def _masked_input_replace(input_, *, org_start, org_end, added_start, added_end, added_offset, padding):
    return torch.ops.kunlun.masked_input(input_, org_start, org_end, padding, added_start, added_end)


MASKED_INPUT_RULES = [Rewrite(
    family="masked_input", name="vllm_get_masked_input_and_mask", search=get_masked_input_and_mask,
    replace=_masked_input_replace,
    example_inputs=lambda dtype: (torch.randint(0, 500000, (7,)),),
    constants={"org_start": _ORG_START, "org_end": _ORG_END, "added_start": _ADDED_START,
               "added_end": _ADDED_END, "added_offset": _ADDED_OFFSET},
    guard=_masked_input_guard, dtypes=(),
    needs=(aten.bitwise_or.Tensor,))]


# ---- attention masks ---------------------------------------------------------------------------------

def _make_mask_search(window: bool, padding: bool, additive: bool, dtype: torch.dtype):
    def allowed_of(positions, key_valid, sliding_window):
        q_pos, k_pos = positions.unsqueeze(1), positions.unsqueeze(0)
        allowed = k_pos <= q_pos
        if window:
            allowed = allowed & (q_pos - k_pos < sliding_window)
        if padding:
            allowed = allowed & key_valid.unsqueeze(0)
        if not additive:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(~allowed, float("-inf"))

    if padding:
        def search(positions, key_valid, sliding_window=None):
            return allowed_of(positions, key_valid, sliding_window)
    else:
        def search(positions, sliding_window=None):
            return allowed_of(positions, None, sliding_window)
    return search


def _mask_guard(b: Bindings, window: bool, padding: bool):
    pos = b.val("positions")
    reason = None if pos.dim() == 1 and pos.dtype in (torch.int32, torch.int64) else \
        f"positions {tuple(pos.shape)} {pos.dtype}: need 1-D int"
    if not reason and window:
        w = b.scalar("sliding_window")
        reason = None if isinstance(w, int) and not isinstance(w, bool) and w > 0 else \
            f"sliding window {w!r} is not a positive integer constant"
    if not reason and padding:
        kv = b.val("key_valid")
        reason = None if kv.dtype == torch.bool and kv.dim() == 1 else f"key_valid {kv.dtype} {tuple(kv.shape)}"
    return Refusal(reason) if reason else {}


def _mask_replace(*tensors, window, padding, additive, dtype, sliding_window=0):
    positions = tensors[0]
    key_valid = tensors[1] if padding else None
    return torch.ops.kunlun.attention_mask(positions, positions, key_valid, True,
                                           sliding_window if window else 0,
                                           dtype if additive else torch.bool, float("-inf"))


def _mask_rule(window: bool, padding: bool, additive: bool, dtype: torch.dtype) -> Rewrite:
    name = "_".join(["causal"] + (["window"] if window else []) + (["padding"] if padding else []) +
                    ["additive" if additive else "bool"])

    def inputs(_dtype):
        pos = torch.arange(3, 10)
        return (pos, torch.rand(7) > 0.3) if padding else (pos,)

    return Rewrite(family="attention_mask", name=name, search=_make_mask_search(window, padding, additive, dtype),
                   replace=lambda *t, **p: _mask_replace(*t, window=window, padding=padding, additive=additive,
                                                         dtype=dtype, **p),
                   example_inputs=inputs, constants={"sliding_window": _WINDOW} if window else {},
                   guard=lambda b: _mask_guard(b, window, padding), dtypes=(dtype,) if additive else (),
                   needs=(aten.le.Tensor,) + ((aten.masked_fill.Scalar,) if additive else ()) +
                   ((aten.lt.Scalar,) if window else ()) + ((aten.bitwise_and.Tensor,) if window or padding else ()))


# additive masks first: a bool rule would otherwise take the `allowed` part of one
ATTENTION_MASK_RULES = [
    _mask_rule(window, padding, additive, dtype)
    for additive, window, padding in itertools.product((True, False), (True, False), (True, False))
    for dtype in ((torch.float32, torch.bfloat16, torch.float16) if additive else (torch.float32,))
]
