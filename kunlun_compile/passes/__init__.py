"""Graph passes and the table of passes the backend runs, in order.

Registration is explicit and lives here alone: a new pass is one row below.
"""
from __future__ import annotations

from typing import List

from .algebra import restore as restore_algebra
from .cleanup import dead_code, remove_noop_ops
from .layouts import views_after_fused_ops
from .fusion import fusion_passes
from .linear_groups import group_linears
from .lower_elementwise import lower_elementwise
from .manager import GraphPass, PassContext, PassFailure, PassManager, PassOutcome


def default_passes() -> List[GraphPass]:
    return [
        GraphPass("remove_noop_ops", "merge duplicate splits; drop views to the same shape, detach, identity "
                  "permutes/slices and same-dtype copies", remove_noop_ops),
        *fusion_passes(),
        GraphPass("restore_algebra", "arithmetic the fusion passes respelled (x * x, 1 / sqrt, sum / n) and no "
                  "fusion took, back as the model wrote it", restore_algebra),
        GraphPass("group_linears", "kunlun::linear calls on one input (no bias) -> one kunlun::linear_group launch",
                  group_linears),
        GraphPass("dead_code", "erase nodes whose results nobody uses", dead_code),
        GraphPass("lower_elementwise", "element-wise clusters -> KIR (vector/SFU instructions) -> one generated "
                  "Triton kernel each (kunlun::pointwise)", lower_elementwise),
        GraphPass("views_after_fused_ops", "view -> reshape where a fused op's contiguous result may have changed "
                  "the layout the view was traced against", views_after_fused_ops),
    ]


__all__ = ["GraphPass", "PassContext", "PassFailure", "PassManager", "PassOutcome", "default_passes"]
