"""How Dynamo should trace for LLM serving, where the token count varies per call.

- Sizes are traced size-obliviously: by default a batch of 1 is specialised
  into its own graph, and serving calls with every size from 1 up.
- Python floats (eps, scales) stay constants: traced dynamically they become
  runtime inputs, and a fusion guard can no longer see them.

`kunlun_compile.compile(dynamic=True)` applies this around every call; users of
plain `torch.compile(..., dynamic=True)` can wrap their calls in
`kunlun_compile.serving_shapes()`.

The price of size-oblivious tracing: a dim of size 1 in a frame's inputs becomes a symbol that is
not known to be 1, and Dynamo cannot broadcast it ("The size of tensor a (s1: hint = 4) must match
the size of tensor b (s2: hint = 1)").  Frame inputs after a graph break are intermediate values,
and size-1 (broadcast) dims are common there.  So `with_serving_shapes(..., fall_back=True)` lets
Dynamo run a frame it cannot trace eagerly (that frame only: tracing fails before it runs, so
nothing runs twice) and says so in one warning.  Strict backends keep Dynamo's errors.
"""
from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Set

import torch
from torch._dynamo.utils import counters
from torch.fx.experimental import _config as fx_config

from ..utils import warn_once


# (config module, option, value while tracing)
_SERVING_SETTINGS = ((fx_config, "backed_size_oblivious", True), (torch._dynamo.config, "specialize_float", True))


@contextlib.contextmanager
def serving_shapes():
    # Plain attribute swaps rather than `config.patch`: this runs around every call of a
    # compiled model, and `patch` builds a context-manager class each time (~50 µs a call).
    saved = [getattr(module, name) for module, name, _ in _SERVING_SETTINGS]
    for module, name, value in _SERVING_SETTINGS:
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name, _), old in zip(_SERVING_SETTINGS, saved):
            setattr(module, name, old)


def with_serving_shapes(compiled, *, fall_back: bool = False, warned: Optional[Set[str]] = None):
    """Wrap a torch.compile result so every call traces under `serving_shapes()`; with `fall_back`, a
    frame Dynamo cannot trace runs eagerly, with one warning naming why."""
    warned = set() if warned is None else warned

    seen = dict(counters["unimplemented"])  # Dynamo's reasons so far (process-wide, graph breaks too)

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if not fall_back:
                with serving_shapes():
                    return fn(*args, **kwargs)
            saved, torch._dynamo.config.suppress_errors = torch._dynamo.config.suppress_errors, True
            try:
                with serving_shapes():
                    return fn(*args, **kwargs)
            finally:
                torch._dynamo.config.suppress_errors = saved
                if counters["unimplemented"].total() != sum(seen.values()):  # a few reasons: cheap
                    for reason in untraceable_reasons(seen):
                        warn_once("kunlun backend: Dynamo could not trace a frame under serving shapes (size-"
                                  f"oblivious sizes) and runs it eagerly: {_first_detail(reason)}", warned)
        return call

    if isinstance(compiled, torch.nn.Module):  # OptimizedModule: its forward runs the Dynamo frame
        compiled.forward = wrap(compiled.forward)
        return compiled
    return wrap(compiled)


# Dynamo's reason when its fake-tensor run of an op raised: a hard error, which `suppress_errors` turns
# into running the frame eagerly (graph breaks and skipped frames have other reasons)
_UNTRACEABLE = "RuntimeError when making fake tensor call"


def untraceable_reasons(seen: dict) -> List[str]:
    """Reasons Dynamo recorded since `seen` (which is brought up to date) that made it give up a frame."""
    new = [reason for reason, count in counters["unimplemented"].items() if count > seen.get(reason, 0)]
    seen.update(counters["unimplemented"])
    return [reason for reason in new if reason.startswith(_UNTRACEABLE)]


def _first_detail(reason: str) -> str:
    """The op's own error where Dynamo quotes it ("got RuntimeError('The size of tensor a ...')")."""
    at = reason.find("got ")
    if at >= 0:
        return reason[at + 4:].splitlines()[0][:300]
    lines = [ln.strip() for ln in reason.splitlines()[1:] if ln.strip()]
    return lines[0][:300] if lines else reason.splitlines()[0]
