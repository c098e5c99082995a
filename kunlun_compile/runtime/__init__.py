"""The graph runtime: pieces captured per capture set and replayed (CUDA graphs), with fallbacks.

Modules: splitting.py cuts a compiled graph into pieces; token_dims.py proves (or refuses) that a
piece may run on a padded batch; memory_plan.py gives every value a home and checks the rules below;
capture_sets.py decides which captures a call may replay; capture.py captures and replays one piece;
piecewise.py runs a call through the pieces; checking.py is the replay checker; executor.py falls
back to the uncompiled graph for a call that fails.

The memory contract
-------------------
Values.  A call's values are the graph's inputs (the caller's tensors; parameters and buffers), the
outputs of each piece, and the graph's outputs.  Their homes (memory_plan.plan_memory, computed from
the split graph before anything is captured):
- caller inputs are read, never written: the graphs are functional (AOTAutograd applies input
  mutations after the graph returns).  A captured piece reads a caller input through a buffer of its
  own, with the input's sizes and strides, refilled before every replay;
- parameters and buffers are read in place by the captures, at the addresses they had at capture;
- the outputs of a captured piece live in the graph's shared memory pool (one pool per compiled graph,
  shared by all its pieces and capture sets), in memory that piece's capture owns;
- the outputs of an uncaptured piece (attention, host syncs, sizes other than the token count) are
  ordinary allocations of that call.

Who produces and who consumes.  Pieces run in graph order, each once per call; a value crossing pieces
is produced by exactly one piece and consumed only by later pieces of the same call or by the graph
output (plan_memory records producer and consumers of each and refuses a piece that reads a value no
earlier piece made).

When a replay may overwrite memory.  A replay rewrites its capture's outputs and scratch space.  A
capture made later may have been given, for its outputs, memory that an earlier capture uses as
scratch.  So captures are grouped in capture sets (capture_sets.py): a set is a plan, a size and the
addresses of the graph's parameters; all pieces of a set are warmed up, captured and replayed in the
same calls, in graph order.  Within a set, a piece's capture can only reuse the scratch of pieces that
ran before it — which never run again in that call — and a call replays only its own set.  Because
parameters are read in place, a call whose parameters sit elsewhere (another layer, when Dynamo shares
one graph among layers) is a different set: a capture never replays with another set's weights.

Values that must outlive later replays.  Nothing the runtime keeps in graph memory is handed out: every
graph output that lives in graph memory, or is a view of it, is copied before the call returns, and
outputs that share a storage are copied as one storage so their aliasing survives (memory_plan.
copy_outputs).  A graph output that is a view of a caller's input is computed outside captures, so the
caller gets a view of its own tensor.

Outputs the caller holds are therefore never touched by a later call.

Enforced by: plan_memory's refusals (a piece that writes an input in place, or returns a view of a
caller input from inside a capture, is not captured); the capture-set key; the copies.  Checked at run
time by `check_replays=True` (checking.py): every replay against its piece run as plain code, and every
crossing value against a copy taken when it was made.
"""
from .executor import GraphExecutor
from .piecewise import GraphRuntime

__all__ = ["GraphExecutor", "GraphRuntime"]
