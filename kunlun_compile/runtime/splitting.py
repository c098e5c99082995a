"""Split an ATen graph into pieces at splitting ops.

A piece is either a run of capturable nodes (`kind == "graph"`: captured and
replayed per size) or one splitting node (`kind == "eager"`: called directly,
every time, at the real size).  Splitting ops are
- attention ops: they read per-request state (lengths, caches) that a padded
  captured batch would get wrong, and vLLM keeps them outside its pieces too;
- collectives, which must run outside a captured region;
- anything that syncs with the host (`.item()`, `nonzero`, data-dependent
  shapes) or makes CPU tensors in a GPU graph: a capture cannot contain it;
- anything whose sizes depend on a symbol other than the token count (a KV
  length that grows every decode step): a capture replays one fixed size.

The graph is already in topological order, so the split is one linear walk: a
piece's inputs are the values it uses from earlier pieces (or graph inputs),
its outputs the values later pieces (or the graph output) use.  Values keep the
original node names, and each piece's placeholders keep their `meta["val"]`.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from ..config import ATTENTION_OPS, HOST_SYNC_OPS  # defined with the options, which are checked against them
from .aliasing import is_view

aten = torch.ops.aten

COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d", "_dtensor")


def op_name(target) -> str:
    """'aten::mm' style name of a call target ('' for Python callables)."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        overload = schema.overload_name
        return f"{schema.name}.{overload}" if overload else schema.name
    name = getattr(target, "name", None)
    return name() if callable(name) else ""


def _matches(name: str, listed: Iterable[str]) -> bool:
    base = name.split(".")[0]
    return any(name == x or base == x for x in listed)


@dataclasses.dataclass(frozen=True)
class SplitReason:
    """Why a node runs outside captured pieces.  `kind` is one of KINDS; `soft` kinds (attention,
    user-chosen ops) may still be captured inside a whole-graph capture, hard kinds never."""

    kind: str
    detail: str

    KINDS = ("attention", "user", "host_sync", "collective", "cpu_tensor", "dynamic_shape", "input_view",
             "found_sync")
    SOFT = ("attention", "user", "input_view")
    # consecutive nodes of these kinds share one eager piece (one call instead of one per node)
    GROUPED = ("dynamic_shape", "input_view")
    _PREFIX = {"attention": "attention op", "user": "user splitting op", "host_sync": "host sync",
               "collective": "collective", "cpu_tensor": "", "dynamic_shape": "", "input_view": "",
               "found_sync": ""}

    @property
    def hard(self) -> bool:
        return self.kind not in self.SOFT

    def __str__(self) -> str:
        prefix = self._PREFIX[self.kind]
        return f"{prefix} {self.detail}" if prefix else self.detail


def _foreign_symbols(node: fx.Node, capturable: FrozenSet[sympy.Symbol]) -> List[sympy.Symbol]:
    """Symbols other than `capturable` in the sizes of `node`'s inputs and outputs, by name."""
    found = set()
    for v in _vals(node) + [a.meta.get("val") for a in node.all_input_nodes]:
        found |= _free_symbols(v)
    return sorted(found - capturable, key=str)


def _free_symbols(v) -> set:
    if isinstance(v, torch.SymInt):
        return set(v.node.expr.free_symbols)
    if isinstance(v, torch.Tensor):
        out = set()
        for s in (*v.shape, *v.stride(), v.storage_offset()):
            if isinstance(s, torch.SymInt):
                out |= s.node.expr.free_symbols
        return out
    return set()


def split_reason(node: fx.Node, extra_splitting_ops: Sequence[str] = (), graph_device: str = "cuda",
                 capturable_symbols: Optional[FrozenSet[sympy.Symbol]] = None) -> Optional[SplitReason]:
    """Why `node` must run outside a captured piece, or None.

    `capturable_symbols`: the size symbols a capture may depend on (the token count, which the
    runtime keys and pads its captures by).  A node whose sizes involve any other symbol (a KV-cache
    length, an unbacked data-dependent size) runs uncaptured: that size can change on every call, and a
    replay would run at the size of its capture.  None: symbols are not checked."""
    if node.op != "call_function":
        return None
    name = op_name(node.target)
    if not name:
        if capturable_symbols is not None:  # Python arithmetic on sizes (operator.mul of SymInts, ...)
            foreign = _foreign_symbols(node, capturable_symbols)
            if foreign:
                return SplitReason("dynamic_shape", f"{node.name} depends on size {foreign[0]}, "
                                                    "which is not the token count")
        return None
    if _matches(name, ATTENTION_OPS):
        return SplitReason("attention", name)
    if _matches(name, extra_splitting_ops):
        return SplitReason("user", name)
    if _matches(name, HOST_SYNC_OPS):
        return SplitReason("host_sync", name)
    if name.split("::")[0] in COLLECTIVE_NAMESPACES:
        return SplitReason("collective", name)
    if graph_device == "cuda" and any(isinstance(v, torch.Tensor) and v.device.type == "cpu"
                                      for v in _vals(node)):
        return SplitReason("cpu_tensor", f"{name} makes a CPU tensor")
    if graph_device == "cuda" and any(isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].device.type == "cpu"
                                      for a in node.all_input_nodes):
        # a capture would copy (or read, for a 0-dim tensor) the CPU value once, at capture
        return SplitReason("cpu_tensor", f"{name} reads a CPU tensor")
    if capturable_symbols is not None:
        foreign = _foreign_symbols(node, capturable_symbols)
        if foreign:
            return SplitReason("dynamic_shape", f"{name} depends on size {foreign[0]}, which is not the token "
                                                "count")
    return None


def _vals(node: fx.Node) -> List:
    v = node.meta.get("val")
    return list(v) if isinstance(v, (list, tuple)) else [v]


@dataclasses.dataclass
class Piece:
    index: int
    kind: str  # "graph": captured and replayed; "eager": called directly at the real size
    reason: str  # for eager pieces: why the node was cut out
    gm: fx.GraphModule
    inputs: List[str]  # value names, in the order the piece takes them
    outputs: List[str]  # value names, in the order it returns them
    input_vals: List  # meta vals (FakeTensor / SymInt / python value) of the inputs
    output_vals: List

    @property
    def nodes(self) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))

    def describe(self) -> str:
        if self.kind == "eager":
            return f"piece {self.index}: eager, {self.reason}"
        return f"piece {self.index}: graph, {self.nodes} nodes"


@dataclasses.dataclass
class SplitGraph:
    pieces: List[Piece]
    graph_inputs: List[str]  # placeholder names in order
    graph_outputs: List  # value names (str) or python constants, in the output's order


def assign_pieces(gm: fx.GraphModule, reasons: Dict[fx.Node, SplitReason]) -> Dict[fx.Node, int]:
    """Node -> piece index; a splitting node gets a piece of its own (consecutive nodes of a grouped
    kind share one), its getitems join it."""
    piece_of: Dict[fx.Node, int] = {}
    current, current_open = -1, False
    open_group: Optional[str] = None  # the grouped kind of the eager piece just made, if any
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in piece_of:
            # with its source: only tensors cross pieces, never the list a split or unbind returns
            piece_of[node] = piece_of[node.args[0]]
            continue
        if node in reasons:
            kind = reasons[node].kind
            if not (open_group == kind and kind in SplitReason.GROUPED):
                current += 1
            piece_of[node] = current
            current_open = False
            open_group = kind
            continue
        open_group = None
        if not current_open:
            current += 1
            current_open = True
        piece_of[node] = current
    return piece_of


def split_graph(gm: fx.GraphModule, reasons: Dict[fx.Node, SplitReason]) -> SplitGraph:
    """Cut `gm` at the nodes in `reasons` (node -> why).  With no reasons: one graph piece."""
    piece_of = assign_pieces(gm, reasons)
    count = max(piece_of.values(), default=-1) + 1
    members: List[List[fx.Node]] = [[] for _ in range(count)]
    for node in gm.graph.nodes:
        if node in piece_of:
            members[piece_of[node]].append(node)
    output_node = next(iter(gm.graph.find_nodes(op="output")))
    outs = output_node.args[0]
    graph_out_nodes = list(outs) if isinstance(outs, (list, tuple)) else [outs]  # AOT graphs return a flat tuple

    def used_later(node: fx.Node, idx: int) -> bool:
        return any(u.op == "output" or piece_of.get(u, idx) != idx for u in node.users)

    pieces = []
    for idx, nodes in enumerate(members):
        if not nodes:
            continue
        inside = set(nodes)
        build = _PieceBuilder()
        for n in nodes:
            for dep in n.all_input_nodes:
                if dep not in inside:
                    build.load(dep)
            if n.op == "get_attr":
                build.load(n)
                continue
            build.copy(n)
        graph, env, inputs = build.graph, build.env, build.inputs
        outs = [n for n in nodes if n.op != "get_attr" and used_later(n, idx)]
        graph.output(tuple(env[n] for n in outs))
        root = torch.nn.Module()
        for used in nodes + [dep for node in nodes for dep in node.all_input_nodes]:
            if used.op == "get_attr":
                _copy_attr(gm, root, used.target)
        piece_gm = fx.GraphModule(root, graph, f"piece_{idx}")
        eager_reason = next((str(reasons[n]) for n in nodes if n in reasons), None)
        pieces.append(Piece(len(pieces), "eager" if eager_reason else "graph", eager_reason or "",
                            piece_gm, [n.name for n in inputs], [n.name for n in outs],
                            [n.meta.get("val") for n in inputs], [n.meta.get("val") for n in outs]))
    flat = [x.name if isinstance(x, fx.Node) else x for x in graph_out_nodes]
    return SplitGraph(pieces, [n.name for n in gm.graph.find_nodes(op="placeholder")], flat)


class _PieceBuilder:
    """One piece's graph: nodes copied in, values from outside loaded as placeholders (constants as
    get_attrs of their own)."""

    def __init__(self):
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, fx.Node] = {}
        self.inputs: List[fx.Node] = []  # the outer nodes the placeholders stand for, in order

    def load(self, n: fx.Node) -> fx.Node:
        if n in self.env:
            return self.env[n]
        if n.op == "get_attr":  # constants are copied into the piece that uses them
            self.env[n] = self.graph.get_attr(n.target)
            self.env[n].meta = dict(n.meta)
            return self.env[n]
        p = self.graph.placeholder(n.name)
        p.meta = dict(n.meta)
        self.env[n] = p
        self.inputs.append(n)
        return p

    def copy(self, n: fx.Node) -> None:
        self.env[n] = self.graph.node_copy(n, self.load)


def _copy_attr(src: torch.nn.Module, dst: torch.nn.Module, target: str) -> None:
    *path, leaf = target.split(".")
    s, d = src, dst
    for p in path:
        s = getattr(s, p)
        if not hasattr(d, p):
            d.add_module(p, torch.nn.Module())
        d = getattr(d, p)
    value = getattr(s, leaf)
    if isinstance(value, torch.nn.Parameter):
        d.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        d.register_buffer(leaf, value)
    else:
        setattr(d, leaf, value)


def input_view_nodes(gm: fx.GraphModule, parameters: FrozenSet[str]) -> Dict[fx.Node, SplitReason]:
    """The view chains from a caller's input to a graph output.  They run outside captures: inside one
    they would view the capture's copy of the input, and the caller must get a view of its own tensor."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    outs = output.args[0] if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    found: Dict[fx.Node, SplitReason] = {}
    for out in outs:
        chain = []
        node = out
        while isinstance(node, fx.Node) and is_view(node):
            chain.append(node)
            node = node.args[0]
        if chain and isinstance(node, fx.Node) and node.op == "placeholder" and node.name not in parameters:
            for n in chain:
                found[n] = SplitReason("input_view", f"{n.name} is a view of the input {node.name}, returned")
    return found


def splitting_nodes(gm: fx.GraphModule, extra_splitting_ops: Sequence[str] = (), graph_device: str = "cuda",
                    capturable_symbols: Optional[FrozenSet[sympy.Symbol]] = None) -> Dict[fx.Node, SplitReason]:
    out = {}
    for node in gm.graph.nodes:
        why = split_reason(node, extra_splitting_ops, graph_device, capturable_symbols)
        if why:
            out[node] = why
    return out
