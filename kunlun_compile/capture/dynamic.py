"""How Dynamo should trace for LLM serving, where the token count varies per call.

- Sizes are traced size-obliviously: by default a batch of 1 is specialised
  into its own graph, and serving calls with every size from 1 up.
- Python floats (eps, scales) stay constants: traced dynamically they become
  runtime inputs, and a fusion guard can no longer see them.

`kunlun_compile.compile(dynamic=True)` applies this around every call; users of
plain `torch.compile(..., dynamic=True)` can wrap their calls in
`kunlun_compile.serving_shapes()`.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.fx.experimental import _config as fx_config


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


def with_serving_shapes(compiled):
    """Wrap a torch.compile result so every call traces under `serving_shapes()`."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with serving_shapes():
                return fn(*args, **kwargs)
        return call

    if isinstance(compiled, torch.nn.Module):  # OptimizedModule: its forward runs the Dynamo frame
        compiled.forward = wrap(compiled.forward)
        return compiled
    return wrap(compiled)
