"""Split an ATen graph into pieces at splitting ops.

A piece is either a run of capturable nodes (`kind == "graph"`: captured and
replayed per size) or one splitting node (`kind == "eager"`: called directly,
every time, at the real size).  Splitting ops are
- attention ops: they read per-request state (lengths, caches) that a padded
  captured batch would get wrong, and vLLM keeps them outside its pieces too;
- collectives, which must run outside a captured region;
- anything that syncs with the host (`.item()`, `nonzero`, data-dependent
  shapes) or makes CPU tensors in a GPU graph: a capture cannot contain it.

The graph is already in topological order, so the split is one linear walk: a
piece's inputs are the values it uses from earlier pieces (or graph inputs),
its outputs the values later pieces (or the graph output) use.  Values keep the
original node names, and each piece's placeholders keep their `meta["val"]`.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.fx as fx

aten = torch.ops.aten

# Attention ops by qualified name: the built-in models', vLLM's, and PyTorch's own.
ATTENTION_OPS = (
    "kunlun_models::attention",
    "vllm::unified_attention",
    "vllm::unified_attention_with_output",
    "vllm::unified_mla_attention",
    "vllm::unified_mla_attention_with_output",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
)
# Ops whose result the host must see (a capture would bake in one value or fail).
HOST_SYNC_OPS = (
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
    "aten::_unique2", "aten::unique_consecutive", "aten::item", "aten::equal", "aten::is_nonzero",
    "aten::repeat_interleave.Tensor", "aten::_assert_async", "aten::_assert_async.msg",
)
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


def split_reason(node: fx.Node, extra_splitting_ops: Sequence[str] = (), graph_device: str = "cuda") -> Optional[str]:
    """Why `node` must run outside a captured piece, or None."""
    if node.op != "call_function":
        return None
    name = op_name(node.target)
    if not name:
        return None
    if _matches(name, ATTENTION_OPS):
        return f"attention op {name}"
    if _matches(name, extra_splitting_ops):
        return f"user splitting op {name}"
    if _matches(name, HOST_SYNC_OPS):
        return f"host sync {name}"
    if name.split("::")[0] in COLLECTIVE_NAMESPACES:
        return f"collective {name}"
    if graph_device == "cuda" and any(isinstance(v, torch.Tensor) and v.device.type == "cpu"
                                      for v in _vals(node)):
        return f"{name} makes a CPU tensor"
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


def assign_pieces(gm: fx.GraphModule, reasons: Dict[fx.Node, str]) -> Dict[fx.Node, int]:
    """Node -> piece index; a splitting node gets a piece of its own, its getitems join it."""
    piece_of: Dict[fx.Node, int] = {}
    current, current_open = -1, False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target is operator.getitem and reasons.get(node.args[0]):
            piece_of[node] = piece_of[node.args[0]]
            continue
        if node in reasons:
            current += 1
            piece_of[node] = current
            current_open = False
            continue
        if not current_open:
            current += 1
            current_open = True
        piece_of[node] = current
    return piece_of


def split_graph(gm: fx.GraphModule, reasons: Dict[fx.Node, str]) -> SplitGraph:
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
        graph = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        inputs: List[fx.Node] = []

        def load(n: fx.Node) -> fx.Node:
            if n in env:
                return env[n]
            if n.op == "get_attr":  # constants are copied into the piece that uses them
                env[n] = graph.get_attr(n.target)
                env[n].meta = dict(n.meta)
                return env[n]
            p = graph.placeholder(n.name)
            p.meta = dict(n.meta)
            env[n] = p
            inputs.append(n)
            return p

        for n in nodes:
            for dep in n.all_input_nodes:
                if dep not in inside:
                    load(dep)
            if n.op == "get_attr":
                load(n)
                continue
            env[n] = graph.node_copy(n, lambda a: env[a] if a in env else load(a))
        outs = [n for n in nodes if n.op != "get_attr" and used_later(n, idx)]
        graph.output(tuple(env[n] for n in outs))
        root = torch.nn.Module()
        for n in nodes + [d for n in nodes for d in n.all_input_nodes]:
            if n.op == "get_attr":
                _copy_attr(gm, root, n.target)
        piece_gm = fx.GraphModule(root, graph, f"piece_{idx}")
        eager_reason = next((reasons[n] for n in nodes if n in reasons), None)
        pieces.append(Piece(len(pieces), "eager" if eager_reason else "graph", eager_reason or "",
                            piece_gm, [n.name for n in inputs], [n.name for n in outs],
                            [n.meta.get("val") for n in inputs], [n.meta.get("val") for n in outs]))
    flat = [x.name if isinstance(x, fx.Node) else x for x in graph_out_nodes]
    return SplitGraph(pieces, [n.name for n in gm.graph.find_nodes(op="placeholder")], flat)


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


def splitting_nodes(gm: fx.GraphModule, extra_splitting_ops: Sequence[str] = (),
                    graph_device: str = "cuda") -> Dict[fx.Node, str]:
    out = {}
    for node in gm.graph.nodes:
        why = split_reason(node, extra_splitting_ops, graph_device)
        if why:
            out[node] = why
    return out
