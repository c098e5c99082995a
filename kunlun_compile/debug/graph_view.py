"""`kunlun-compile graph`: the compiled graph as a picture — its pieces (what the runtime captures
between splitting ops, as on CUDA) and what each node became (a fused kernel, a generated
element-wise kernel, an ATen op, a splitting op).

The picture is SVG laid out here (rows by dependency depth inside each piece, pieces stacked),
wrapped in a self-contained HTML page; with `dot` (graphviz) installed, `to_dot` gives the same
content for graphviz's own layout.
"""
from __future__ import annotations

import html
import operator
from typing import Dict, List, Sequence, Tuple

import torch.fx as fx

from ..runtime.splitting import assign_pieces, op_name, splitting_nodes

KINDS = {  # kind -> (fill colour, legend)
    "fused": ("#f4a259", "fused kunlun:: op"),
    "generated": ("#8cb369", "generated element-wise kernel"),
    "split": ("#bc4b51", "splitting op (runs outside captured pieces)"),
    "aten": ("#cfd8dc", "ATen op"),
    "input": ("#ffffff", "graph input"),
}
BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 150, 26, 16, 22, 14


def node_kind(n: fx.Node, reasons: Dict[fx.Node, str]) -> str:
    if n.op == "placeholder":
        return "input"
    if n in reasons:
        return "split"
    name = op_name(n.target)
    if name == "kunlun::pointwise":
        return "generated"
    if name.startswith("kunlun::"):
        return "fused"
    return "aten"


def _shown(n: fx.Node) -> bool:
    """getitems and size queries are plumbing: drawn through, not as boxes."""
    return n.op in ("placeholder", "call_function") and n.target is not operator.getitem and \
        not op_name(n.target).startswith("aten::sym_")


def _source(n: fx.Node) -> fx.Node:
    while n.op == "call_function" and n.target is operator.getitem:
        n = n.args[0]
    return n


def describe(gm: fx.GraphModule, splitting_ops: Sequence[str] = ()) -> Dict:
    """Pieces (as `graph_mode="piecewise"` would cut them on the graph's device), nodes (name, op,
    kind, piece) and edges of one compiled graph."""
    on_cuda = any(getattr(n.meta.get("val"), "is_cuda", False) for n in gm.graph.find_nodes(op="placeholder"))
    reasons = splitting_nodes(gm, splitting_ops, "cuda" if on_cuda else "cpu")
    piece_of = assign_pieces(gm, reasons)
    nodes, edges = [], []
    for n in gm.graph.nodes:
        if not _shown(n):
            continue
        nodes.append({"name": n.name, "op": "input" if n.op == "placeholder" else op_name(n.target),
                      "kind": node_kind(n, reasons), "piece": piece_of.get(n, -1),
                      "origin": n.meta.get("kunlun_lowered_from", [])})
        for a in n.all_input_nodes:
            src = _source(a)
            if _shown(src):
                edges.append((src.name, n.name))
    pieces = sorted({p["piece"] for p in nodes if p["piece"] >= 0})
    return {"pieces": [{"index": i, "reason": next((reasons[n] for n, p in piece_of.items()
                                                     if p == i and n in reasons), None)} for i in pieces],
            "nodes": nodes, "edges": sorted(set(edges))}


def _layout(desc: Dict) -> Tuple[Dict[str, Tuple[float, float]], List[Tuple[int, float, float, float]], float, float]:
    """Box positions; piece bands (index, y, height, width); canvas size."""
    depth: Dict[str, int] = {}
    preds: Dict[str, List[str]] = {}
    for a, b in desc["edges"]:
        preds.setdefault(b, []).append(a)
    piece = {n["name"]: n["piece"] for n in desc["nodes"]}
    for n in desc["nodes"]:  # nodes are in topological order: a row below every input in the same piece
        depth[n["name"]] = 1 + max((depth[p] for p in preds.get(n["name"], []) if piece[p] == n["piece"]),
                                   default=-1)
    pos, bands, y, width = {}, [], PAD, 0.0
    groups = [(-1, [n for n in desc["nodes"] if n["piece"] < 0])] + \
             [(p["index"], [n for n in desc["nodes"] if n["piece"] == p["index"]]) for p in desc["pieces"]]
    for index, members in groups:
        if not members:
            continue
        rows: Dict[int, List[str]] = {}
        for n in members:
            rows.setdefault(depth[n["name"]], []).append(n["name"])
        top = y + (PAD + 14 if index >= 0 else 0)
        for r, (_, names) in enumerate(sorted(rows.items())):
            for c, name in enumerate(names):
                pos[name] = (2 * PAD + c * (BOX_W + GAP_X), top + r * (BOX_H + GAP_Y))
                width = max(width, 3 * PAD + (c + 1) * (BOX_W + GAP_X))
        height = (top - y) + len(rows) * (BOX_H + GAP_Y) + PAD
        bands.append((index, y, height, 0.0))
        y += height + PAD
    bands = [(i, by, h, width - PAD) for i, by, h, _ in bands]
    return pos, bands, width, y


def to_svg(desc: Dict, title: str) -> str:
    pos, bands, width, height = _layout(desc)
    esc = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height + 30:.0f}" '
           f'font-family="monospace" font-size="11"><title>{esc(title)}</title>']
    reasons = {p["index"]: p["reason"] for p in desc["pieces"]}
    for index, y, h, w in bands:
        if index < 0:
            continue
        label = f"piece {index}" + (f": {reasons[index]}" if reasons.get(index) else ": captured")
        fill = "#fbe9e7" if reasons.get(index) else "#e3f2fd"
        out.append(f'<g class="piece" data-piece="{index}"><rect x="{PAD}" y="{y:.0f}" width="{w:.0f}" '
                   f'height="{h:.0f}" fill="{fill}" stroke="#90a4ae" rx="6"/>'
                   f'<text x="{PAD + 6}" y="{y + 14:.0f}">{esc(label)}</text></g>')
    for a, b in desc["edges"]:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        out.append(f'<line class="edge" x1="{x1 + BOX_W / 2:.0f}" y1="{y1 + BOX_H:.0f}" x2="{x2 + BOX_W / 2:.0f}" '
                   f'y2="{y2:.0f}" stroke="#78909c" stroke-width="0.8"/>')
    for n in desc["nodes"]:
        x, y = pos[n["name"]]
        fill = KINDS[n["kind"]][0]
        tip = n["op"] + (f" (from {', '.join(n['origin'])})" if n["origin"] else "")
        label = n["op"].replace("aten::", "").replace("kunlun::", "k::")
        out.append(f'<g class="node {n["kind"]}" data-name="{esc(n["name"])}"><title>{esc(n["name"])}: '
                   f'{esc(tip)}</title><rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="4" '
                   f'fill="{fill}" stroke="#455a64"/>'
                   f'<text x="{x + 5:.0f}" y="{y + 17:.0f}">{esc(label[:20])}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


def to_dot(desc: Dict) -> str:
    lines = ["digraph G {", "  node [shape=box, style=filled, fontname=monospace];"]
    for p in desc["pieces"]:
        lines.append(f'  subgraph cluster_{p["index"]} {{ label="piece {p["index"]}'
                     f'{": " + p["reason"] if p["reason"] else ""}";')
        for n in desc["nodes"]:
            if n["piece"] == p["index"]:
                lines.append(f'    "{n["name"]}" [label="{n["op"]}", fillcolor="{KINDS[n["kind"]][0]}"];')
        lines.append("  }")
    for n in desc["nodes"]:
        if n["piece"] < 0:
            lines.append(f'  "{n["name"]}" [label="{n["name"]}", fillcolor="{KINDS["input"][0]}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in desc["edges"]] + ["}"]
    return "\n".join(lines)


def html_page(graphs: List[Tuple[str, Dict]], title: str) -> str:
    legend = "".join(f'<span class="key" style="background:{c}">{html.escape(t)}</span> ' for c, t in KINDS.values())
    body = "".join(f'<section class="graph" data-graph="{html.escape(name)}"><h2>{html.escape(name)}: '
                   f'{len(d["pieces"])} pieces, {len(d["nodes"])} nodes</h2>{to_svg(d, name)}</section>'
                   for name, d in graphs)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} .key{{padding:2px 6px;margin-right:4px;border:1px solid #999}}</style>
</head><body><h1>{html.escape(title)}</h1><p class="legend">{legend}</p>{body}</body></html>
"""
