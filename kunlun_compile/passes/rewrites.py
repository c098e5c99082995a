"""Every individual rewrite a pass makes: logged, limitable (for bisecting), and traceable.

A pass that replaces subgraphs asks `rewrite_allowed(description, nodes)` before each
replacement and calls `mark_replacement(old, new)` for each value it replaces.  Normally every
rewrite is allowed and nothing is kept.  Under `limit_rewrites(pass_name, n)` (what `kunlun-compile
bisect` uses) that pass makes only its first n rewrites and the log says which they were.
`mark_replacement` leaves `node.meta["kunlun_replaces"]` = the replaced node's name, so a value
of the compiled graph can be compared with the value it stands for (`kunlun-compile align`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator, List, Optional, Sequence

import torch.fx as fx

REPLACES = "kunlun_replaces"
MADE_BY = "kunlun_made_by"  # node meta: the rule whose replacement computed this value
REFUSED = "kunlun_refused"  # node meta: a rule whose guard refused a match holding this node (its near miss)

# (pass name, graph name) of the pass running now
_current_pass: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("kunlun_pass", default=None)


@dataclasses.dataclass
class RewriteLog:
    pass_name: str
    limit: Optional[int]  # None: every rewrite is made (and logged)
    made: List[str] = dataclasses.field(default_factory=list)  # descriptions, in order
    nodes: List[List[str]] = dataclasses.field(default_factory=list)  # the matched nodes of each
    graphs: List[str] = dataclasses.field(default_factory=list)  # the graph each was made in
    refused: int = 0  # rewrites that were possible but over the limit


_log: contextvars.ContextVar[Optional[RewriteLog]] = contextvars.ContextVar("kunlun_rewrite_log", default=None)


@contextlib.contextmanager
def running_pass(name: str, graph: str) -> Iterator[None]:
    token = _current_pass.set((name, graph))
    try:
        yield
    finally:
        _current_pass.reset(token)


@contextlib.contextmanager
def limit_rewrites(pass_name: str, limit: Optional[int]) -> Iterator[RewriteLog]:
    """Within this block, pass `pass_name` makes at most `limit` rewrites (None: all), logged."""
    log = RewriteLog(pass_name, limit)
    token = _log.set(log)
    try:
        yield log
    finally:
        _log.reset(token)


def rewrite_allowed(description: str, nodes: Sequence[fx.Node] = ()) -> bool:
    log, current = _log.get(), _current_pass.get()
    if log is None or current is None or log.pass_name != current[0]:
        return True
    if log.limit is not None and len(log.made) >= log.limit:
        log.refused += 1
        return False
    log.made.append(description)
    log.nodes.append([n.name for n in nodes])
    log.graphs.append(current[1])
    return True


def mark_replacement(old: fx.Node, new: fx.Node, rule: Optional[str] = None) -> None:
    new.meta[REPLACES] = old.meta.get(REPLACES, old.name)
    if rule is not None:
        new.meta[MADE_BY] = rule
