"""The parts of the vLLM integration that need no vLLM: options, duplicate splits, recorded op references."""
import pytest
import torch
import torch.fx as fx

from kunlun_compile.debug.graph_io import graph_from_data, graph_to_data
from kunlun_compile.passes.cleanup import merge_duplicates
from kunlun_compile.vllm.options import config_from_vllm, options_from_vllm


def test_options_come_from_inductor_compile_config_and_default_to_no_graph_runtime():
    assert options_from_vllm({}) == {"graph_mode": "none"}
    config = config_from_vllm({"enable_auto_functionalized_v2": False,
                               "kunlun": {"fast_math": True, "disable": ["moe_ffn"], "dump_dir": "/tmp/x"}})
    assert (config.fast_math, config.disable, config.dump_dir, config.graph_mode) == (True, ("moe_ffn",), "/tmp/x",
                                                                                       "none")
    assert config_from_vllm({"kunlun": {"graph_mode": "full"}}).graph_mode == "full"
    with pytest.raises(ValueError, match="unknown option"):
        config_from_vllm({"kunlun": {"fastmath": True}})
    with pytest.raises(TypeError, match="dict of options"):
        config_from_vllm({"kunlun": "fast_math"})


def _two_splits(x):
    a = torch.ops.aten.split_with_sizes.default(x, [4, 2, 2], -1)
    b = torch.ops.aten.split_with_sizes.default(x, [4, 2, 2], -1)
    c = torch.ops.aten.split_with_sizes.default(x, [2, 2, 4], -1)  # other sizes: a different split
    return a[0] + 1, b[1] * 2, c[2]


def test_duplicate_splits_merge_and_nothing_else():
    gm = fx.symbolic_trace(_two_splits)
    x = torch.randn(3, 8)
    want = gm(x)
    assert merge_duplicates(gm) == 1
    gm.recompile()
    splits = [n for n in gm.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default]
    assert len(splits) == 2
    for w, g in zip(want, gm(x)):
        torch.testing.assert_close(g, w)


def test_recorded_graph_keeps_op_references_and_higher_order_ops():
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.higher_order.auto_functionalized_v2,
                               (torch.ops.aten.add_.Tensor,), {"self": x})
    graph.output(node)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    data, tensors = graph_to_data(gm)
    back = graph_from_data(data, tensors)
    (call,) = [n for n in back.graph.nodes if n.op == "call_function"]
    assert call.target is torch.ops.higher_order.auto_functionalized_v2
    assert call.args[0] is torch.ops.aten.add_.Tensor
