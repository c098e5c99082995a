"""The fusion passes inside vLLM's own inductor pipeline, as a post-grad custom pass.

For users who keep inductor for everything else:

    compilation_config={"mode": 3, "backend": "inductor",
                        "inductor_passes": {"post_grad_custom_post_pass": "kunlun_compile.vllm_fusion_pass"}}

vLLM's pass manager runs it on each piece's functional post-grad ATen graph;
matched subgraphs become `torch.ops.kunlun.*` calls, which inductor runs as
extern kernels, and inductor generates everything else (our element-wise
lowering is not run here).  Options come from the environment
(KUNLUN_COMPILE_DISABLE, ...) or, built by hand in Python, from the
constructor: `KunlunFusionPass(disable=["moe_ffn"])`.
"""
from __future__ import annotations

import itertools

import torch
import torch.fx as fx
from vllm.compilation.passes.inductor_pass import InductorPass

from ..config import CompileConfig
from ..passes import PassContext, PassManager, default_passes
from ..report import CompileReport, GraphReport
from ..utils import copy_graph_module, options_key

# inductor generates the element-wise code in this pipeline, and picks (and fuses around) its own
# matmul kernels
NOT_IN_INDUCTOR = ("lower_elementwise", "decode_linear", "group_linears")


def fusion_only_passes() -> list:
    return [p for p in default_passes() if p.name not in NOT_IN_INDUCTOR]


class KunlunFusionPass(InductorPass):
    """A vLLM `InductorPass` running this backend's fusion passes; its report is `.report`."""

    def __init__(self, **options) -> None:
        self.config = CompileConfig.from_options({"report": False, **options})
        self.manager = PassManager(fusion_only_passes())
        self.manager.check_disabled(self.config)
        self.report = CompileReport()
        self.warned: set = set()
        self._ids = itertools.count()

    def __deepcopy__(self, memo):
        # vLLM deep-copies its config for the engine; the copy must report into the same `.report`
        return self

    def uuid(self) -> str:
        # inductor's cache key for graphs this pass touched: our code and options, not just this file
        return options_key(self.config.as_dict())

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        name = f"post_grad_{next(self._ids)}"
        report = GraphReport(name)
        # the manager may swap in a snapshot when a pass fails, so it works on a copy, and the
        # result replaces the graph's nodes in place only when something matched
        result = self.manager.run(copy_graph_module(gm), PassContext(self.config, name, self.warned), report)
        self.report.graphs.append(report)
        if sum(p.matches for p in report.passes):
            _forget_traced_inputs(result.graph)
            _as_inductor_spells(result.graph)
            _replace_nodes(graph, result.graph)


def _as_inductor_spells(graph: fx.Graph) -> None:
    """Our canonical spellings back to inductor's post-grad ones: `aten.t` as `permute(x, [1, 0])`, a cast
    `_to_copy(x, dtype=d)` as `prims.convert_element_type(x, d)`.  The post-grad graph has decomposed both
    away, and inductor's lowering refuses them ("both a fallback and a decomp for same op")."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.t.default:
            node.target, node.args = torch.ops.aten.permute.default, (node.args[0], [1, 0])
        elif node.target is torch.ops.aten._to_copy.default and set(node.kwargs) == {"dtype"}:
            node.target, node.args, node.kwargs = (torch.ops.prims.convert_element_type.default,
                                                   (node.args[0], node.kwargs["dtype"]), {})


def _forget_traced_inputs(graph: fx.Graph) -> None:
    """Drop the `eager_input_vals` a `kunlun::` call carries from the trace of its replacement.  Inductor lowers a
    custom op with such a record by matching the call's arguments to it one by one (`constrain_to_fake_tensors`),
    and a call a later rewrite changed (`read_half_tables` adds `half_width`) no longer fits it: the lowering
    fails.  Without the record inductor takes the call as a custom pass made it; the ops take any strides."""
    for node in graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", None) == "kunlun":
            node.meta.pop("eager_input_vals", None)


def _replace_nodes(graph: fx.Graph, new: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        graph.erase_node(node)
    graph.output(graph.graph_copy(new, {}))
