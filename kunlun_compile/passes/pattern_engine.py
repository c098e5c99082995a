"""The pattern engine: rewrite rules written as plain PyTorch, matched on ATen graphs.

A `Rewrite` is data: a search function and a replacement, both plain PyTorch,
example inputs to trace the search function with, the float constants it takes
from the graph (eps, offsets, scales), and a guard that decides whether a match
may be replaced and with which parameters.

Why inductor's pattern matcher (`torch._inductor.pattern_matcher`), used
standalone: it matches a traced graph as a tree from an anchor node, supports
several outputs, checks that no intermediate value is used outside the match
(user counts), binds pattern inputs and chosen constants by name, and replaces a
match by tracing the replacement with the matched values (symbolic sizes
included).  vLLM's compilation passes rely on the same pieces, so they are kept
working across PyTorch releases.  `torch.fx`'s SubgraphMatcher has none of the
binding, so the replacement and the constants would have to be rebuilt by hand.

What is ours:
- patterns are traced with the backend's own decomposition table and
  functionalization, then put through `canonicalize`, exactly as the target is;
- integer sizes inside shape arguments (view sizes, split sizes, slice bounds)
  are wildcards, because the target's are symbolic; every other literal (dtypes,
  exponents, dims, floats not named as constants) must match exactly, and the
  guard re-derives sizes from the matched tensors' shapes;
- a refused match, or one blocked only because an intermediate value escapes,
  is recorded with its reason (a near miss), so "why didn't this fuse?" has an
  answer.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._inductor import pattern_matcher as pm
from torch.fx.experimental.proxy_tensor import make_fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.passes.tools_common import legalize_graph
from torch.utils._ordered_set import OrderedSet

from ..capture.decompositions import decomposition_table
from ..utils import recompile
from . import pattern_cache, replacement_trace
from .canonical import canonicalize
from .manager import PassOutcome
from .rewrites import MADE_BY, REFUSED, mark_replacement, rewrite_allowed

aten = torch.ops.aten

# op -> positions of arguments whose integers are sizes (wildcards in patterns)
SIZE_ARGUMENTS = {
    aten.view.default: (1,),
    aten.expand.default: (1,),
    aten.split.Tensor: (1,),
    aten.split_with_sizes.default: (1,),
    aten.slice.Tensor: (2, 3),
    aten.zeros.default: (0,),
    aten.ones.default: (0,),
    aten.full.default: (0,),
    aten.empty.memory_format: (0,),
    aten.arange.default: (0,),
    aten.arange.start: (0, 1),
    aten.repeat_interleave.self_int: (1,),
    aten.repeat.default: (1,),
    aten.one_hot.default: (1,),
    aten.topk.default: (1,),
    aten.histc.default: (1, 3),  # bins, max: the number of experts (the guard checks them)
    aten.floor_divide.default: (1,),  # the sorted pair -> token divisor, top-k (the guard checks it)
}
# kwargs of these types never decide a result: devices, pin_memory, layout.
_IGNORED_TYPES = (torch.device,)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A guard's "no": the match stays as it is and `reason` is recorded."""

    reason: str


@dataclasses.dataclass
class Bindings:
    """What a guard sees of one match."""

    match: pm.Match
    tensor_names: Tuple[str, ...]

    def node(self, name: str) -> fx.Node:
        return self.match.kwargs[name]

    def val(self, name: str) -> torch.Tensor:
        return self.node(name).meta["val"]

    def scalar(self, name: str) -> Any:
        return self.match.kwargs[name]

    def nodes(self, target) -> List[fx.Node]:
        """Matched nodes calling `target`, in graph order."""
        order = {n: i for i, n in enumerate(self.match.nodes[0].graph.nodes)} if self.match.nodes else {}
        return sorted((n for n in self.match.nodes if n.target is target), key=lambda n: order.get(n, 0))


Guard = Callable[[Bindings], Union[Refusal, Dict[str, Any]]]


def _no_params(b: Bindings) -> Dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: its patterns are cached per rule
class Rewrite:
    """One rewrite rule.  `replace(*tensors, **params)` gets the search function's tensor
    inputs (in order) and the guard's parameters, and returns what the search function
    returned (same structure)."""

    family: str
    name: str
    search: Callable
    replace: Callable
    example_inputs: Callable[[torch.dtype], Sequence[torch.Tensor]]
    constants: Mapping[str, float] = dataclasses.field(default_factory=dict)  # name -> marker value
    guard: Guard = _no_params
    # float dtypes to trace the pattern for; () when the pattern does integer/bool work only
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    # the float32 form is tried in every graph, not only in those with float32 inputs: work a half model does
    # in float32 (a router behind a float32 linear)
    float32_in_any_graph: bool = False
    # ATen ops the pattern cannot do without: a graph with none of them is not searched (saves the trace)
    needs: Tuple[Any, ...] = ()
    # a primitive op the search function is written with -> the ops ("namespace::name") it also matches
    aliases: Mapping[Any, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # (op, keyword or position) pairs that match any value (spellings that differ by device or model size);
    # the guard checks them
    free_arguments: Tuple[Tuple[Any, Union[str, int]], ...] = ()


# ---- tracing and pattern building -------------------------------------------------------

def trace_aten(fn: Callable, args: Sequence[Any]) -> fx.GraphModule:
    """Trace `fn` the way the backend captures models: functional ATen, our decompositions."""
    with torch.no_grad():
        gm = make_fx(torch.func.functionalize(fn), decomposition_table(), tracing_mode="fake")(*args)
    canonicalize(gm)
    return gm


def _wildcard_sizes(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        positions = SIZE_ARGUMENTS.get(node.target)
        if not positions:
            continue
        args = list(node.args)
        for i in positions:
            if i < len(args):
                args[i] = _as_wildcard(args[i])
        node.args = tuple(args)


def _free_arguments(gm: fx.GraphModule, free: Sequence[Tuple[Any, Union[str, int]]]) -> None:
    for node in gm.graph.nodes:
        keys = [key for op, key in free if node.target is op]
        if keys:
            node.args = tuple(pm.Ignored() if i in keys else a for i, a in enumerate(node.args))
            node.kwargs = {k: pm.Ignored() if k in keys else v for k, v in node.kwargs.items()}


def _float32_markers(gm: fx.GraphModule, markers: Mapping[str, float]) -> None:
    """A marker constant that the traced code rounded to float32 (torch's own decompositions do, for eps)
    is the marker: written back so the pattern binds it by name."""
    rounded = {torch.tensor(v, dtype=torch.float32).item(): v for v in markers.values() if isinstance(v, float)}
    rounded = {k: v for k, v in rounded.items() if k != v}

    def back(x):
        return rounded.get(x, x) if isinstance(x, float) else x
    for node in gm.graph.nodes:
        node.args = tuple(back(a) for a in node.args)
        node.kwargs = {k: back(v) for k, v in node.kwargs.items()}


def _as_wildcard(x):
    if isinstance(x, (list, tuple)):
        return [_as_wildcard(y) for y in x]
    if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool):
        return pm.Ignored()
    return x


def _pattern_nodes(p) -> Iterable[pm.PatternExpr]:
    seen = set()
    stack = [p]
    while stack:
        q = stack.pop()
        if id(q) in seen:
            continue
        seen.add(id(q))
        if isinstance(q, pm.MultiOutputPattern):
            stack.extend(o for o in q.outputs if o is not None)
        elif isinstance(q, pm._TargetArgsExpr):
            yield q
            stack.extend(a for a in q.flat_args_kwargs[0] if isinstance(a, pm.PatternExpr))


def _reaches(src: fx.Node, dst: fx.Node) -> bool:
    """Whether `dst` depends on `src`; the walk stays before `dst` in graph order."""
    if not src < dst:
        return False
    seen, stack = {src}, [src]
    while stack:
        for u in stack.pop().users:
            if u is dst:
                return True
            if u not in seen and u < dst:
                seen.add(u)
                stack.append(u)
    return False


class _DistinctOutputs(pm.MultiOutputPattern):
    """A pattern's outputs are distinct nodes, and the match must not close a cycle.  Inductor's matcher looks
    for the second output among the users of what the first bound, and may bind it to the first output's own
    node when the two chains are alike (q's and k's rotations of shared tables): one replacement per tensor
    instead of one per pair.  And tables shared by every layer make the next layer's k a candidate for this
    layer's q: one replacement for both would read what it produces, so a candidate whose match has an input
    that depends on an output is passed over for the next one."""

    def _match_from_anchors(self, pattern, ctx):
        prior = dict(ctx.pattern_to_node)
        bound = [ctx.pattern_to_node.get(o) for o in self.outputs if o is not None]
        m = pm.FailedMatch("no anchor found")
        for node in pattern.find_anchor_nodes(ctx, OrderedSet(n for n in bound if n is not None)):
            m = ctx.match(pattern, node)
            if pm.is_match(m) and not self._closes_a_cycle(ctx):
                return m
            if pm.is_match(m):
                m = pm.FailedMatch("the outputs' match would read one of its own outputs")
            ctx.pattern_to_node = dict(prior)
        return m

    def _closes_a_cycle(self, ctx) -> bool:
        outputs = [ctx.pattern_to_node.get(o) for o in self.outputs if o is not None]
        inputs = [n for p, n in ctx.pattern_to_node.items()
                  if isinstance(n, fx.Node) and not isinstance(p, pm._TargetExpr)]
        return any(_reaches(o, i) for o in outputs if isinstance(o, fx.Node) for i in inputs)


def _outputs(p) -> List[pm.PatternExpr]:
    return list(p.outputs) if isinstance(p, pm.MultiOutputPattern) else [p]


@dataclasses.dataclass
class CompiledRewrite:
    rule: Rewrite
    dtype: torch.dtype
    strict: pm.PatternExpr  # intermediates used only inside the match
    tensor_names: Tuple[str, ...]
    _relaxed: Callable[[], pm.PatternExpr]

    @property
    def anchor_targets(self):
        first = _outputs(self.strict)[0]
        return first.fns

    @functools.cached_property
    def relaxed(self) -> pm.PatternExpr:
        """Any users: a match of this alone is a near miss.  Built on first use (only where the strict
        pattern failed at a candidate)."""
        return self._relaxed()


def compile_rewrite(rule: Rewrite, dtype: torch.dtype, aliases: Tuple[Tuple[Any, Any], ...] = ()) -> CompiledRewrite:
    """`aliases`: (primitive, op) pairs resolved now (`resolved_aliases`)."""
    request = _trace_request(rule, dtype)
    names = tuple(_parameter_names(rule.search))[: len(request[2])]
    markers = dict(rule.constants)
    gm = pattern_cache.traced(*request)
    _wildcard_sizes(gm)
    _free_arguments(gm, rule.free_arguments)
    _float32_markers(gm, markers)

    def pattern(relaxed: bool) -> pm.PatternExpr:
        p = pm.fx_to_pattern(gm, ignore_types=_IGNORED_TYPES, argnames=names, scalar_workaround=markers)
        if isinstance(p, pm.MultiOutputPattern):
            p.__class__ = _DistinctOutputs
        if relaxed:
            for q in _pattern_nodes(p):
                q.users = pm.MULTIPLE
        else:
            for out in _outputs(p):  # outputs may have any number of users outside
                if isinstance(out, pm._TargetArgsExpr):
                    out.users = pm.MULTIPLE
        _add_aliases(p, aliases)
        return p

    return CompiledRewrite(rule, dtype, pattern(relaxed=False), names, functools.partial(pattern, relaxed=True))


@functools.lru_cache(maxsize=None)
def _trace_request(rule: Rewrite, dtype: torch.dtype):
    """(rule id, dtype, example inputs, how to trace): what pattern_cache keys and traces a pattern by."""
    with unset_fake_temporarily():  # real tensors (made under the compile's fake mode they cost ~3x)
        tensors = list(rule.example_inputs(dtype))
    markers = dict(rule.constants)
    return (f"{rule.family}/{rule.name} {sorted(markers.items())}", dtype, tensors,
            lambda: trace_pattern(lambda *ts: rule.search(*ts, **markers), tensors))


def trace_pattern(fn: Callable, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """A pattern traced on its own static example inputs, whatever compile is running around it.  Inside
    inductor (vLLM's post-grad pass) `make_fx` would otherwise reuse the running compile's fake mode, give
    the examples' sizes symbols of that compile's shape environment and leave guards on them (`x.shape[-1]
    // 2` in a search function) that Dynamo cannot source: "list index out of range" in its guard code.
    Always under the Python dispatcher, as AOT autograd traces the model's graph: without it `one_hot` loses
    its range asserts, and a pattern traced outside a compile (the CLI, a test) would miss compiled graphs."""
    with torch._guards.tracing(None), unset_fake_temporarily(), enable_python_dispatcher():
        mode = FakeTensorMode()
        fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
        return _record_or_trace(fn, fakes, traced_on=example_inputs)


SKIP_PATTERNS_THAT_CANNOT_MATCH = True  # False: build and try every pattern (tests compare both ways)


class GraphIndex:
    """The graph's nodes by op key, for the cheap checks that skip patterns that cannot match."""

    def __init__(self, gm: fx.GraphModule):
        self.by_key: Dict[str, List[fx.Node]] = collections.defaultdict(list)
        for n in gm.graph.nodes:
            if n.op == "call_function":
                self.by_key[pattern_cache.op_key(n.target)].append(n)


def _can_match(rule: Rewrite, dtype: torch.dtype, index: GraphIndex) -> bool:
    """Whether the graph holds every op of the traced pattern (or one its primitive stands for) and a node
    shaped like the pattern's anchor; else the pattern cannot match and is not built."""
    summary = pattern_cache.summary(*_trace_request(rule, dtype))
    if summary is None:
        return True
    alternatives = {pattern_cache.op_key(prim): {pattern_cache.op_key(op) for p, op in resolved_aliases(rule)
                                                 if p is prim} | {pattern_cache.op_key(prim)}
                    for prim in rule.aliases}

    def keys(key: str):
        return alternatives.get(key, (key,))

    if not all(any(k in index.by_key for k in keys(op)) for op in summary.ops):
        return False

    checked: Dict[tuple, bool] = {}  # (node, signature id) -> fits: the signature is a DAG's unfolding

    def fits(node: Any, signature) -> bool:
        memo_key = (node, id(signature))
        if memo_key not in checked:
            key, args = signature
            checked[memo_key] = (isinstance(node, fx.Node) and node.op == "call_function"
                                 and pattern_cache.op_key(node.target) in keys(key)
                                 and all(fits(_argument(node, position), sub) for position, sub in args))
        return checked[memo_key]

    if summary.anchor is None:
        return True
    return any(fits(n, summary.anchor) for k in keys(summary.anchor[0]) for n in index.by_key.get(k, ()))


def _argument(node: fx.Node, position) -> Any:
    """node.args[i], or element j of the list argument i for position (i, j); None where there is none."""
    i, j = position if isinstance(position, tuple) else (position, None)
    arg = node.args[i] if i < len(node.args) else None
    if j is None:
        return arg
    return arg[j] if isinstance(arg, (list, tuple)) and j < len(arg) else None


def resolved_aliases(rule: Rewrite) -> Tuple[Tuple[Any, Any], ...]:
    """(primitive, op) for each alias op registered by now: part of a compiled pattern's cache key, so a
    library imported later (transformers registers its op on import) still gets matched."""
    return tuple((prim, op) for prim, names in rule.aliases.items()
                 for op in map(_resolve_op, names) if op is not None)


def _add_aliases(pattern, aliases: Tuple[Tuple[Any, Any], ...]) -> None:
    """A pattern node calling a primitive also matches the ops the primitive stands for."""
    for q in _pattern_nodes(pattern):
        extra = [op for prim, op in aliases if prim in q.fns_set and op not in q.fns_set]
        if extra:
            q.fns = list(q.fns) + extra
            q.fns_set = type(q.fns_set)(q.fns)


def _resolve_op(qualified: str):
    """"namespace::name" -> its default overload, None while no library has registered it."""
    namespace, name = qualified.split("::")
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


def _parameter_names(fn: Callable) -> List[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@functools.lru_cache(maxsize=None)
def _compiled(rule: Rewrite, dtype: torch.dtype, aliases: Tuple[Tuple[Any, Any], ...],
              dispatch_state: str) -> CompiledRewrite:
    return compile_rewrite(rule, dtype, aliases)


def compiled_pattern(rule: Rewrite, dtype: torch.dtype) -> CompiledRewrite:
    """The rule's pattern for this thread's dispatch state, built once a process per state: it is traced in
    that state, and another state's trace can miss this state's graphs (pattern_cache.dispatch_state)."""
    return _compiled(rule, dtype, resolved_aliases(rule), pattern_cache.dispatch_state())


def _patterns_for(rule: Rewrite, dtypes, index: Optional[GraphIndex] = None) -> List[CompiledRewrite]:
    """One pattern per dtype the graph uses, deduplicated (fp32 and bf16 forms differ in their casts);
    with the graph's `index`, only those that can match it."""
    out, seen = [], set()
    for dtype in rule.dtypes or (torch.float32,):  # () : no float work, one trace serves every graph
        if rule.dtypes and dtype not in dtypes and not (rule.float32_in_any_graph and dtype == torch.float32):
            continue
        if index is not None and SKIP_PATTERNS_THAT_CANNOT_MATCH and not _can_match(rule, dtype, index):
            continue
        c = compiled_pattern(rule, dtype)
        key = repr(c.strict)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def graph_float_dtypes(gm: fx.GraphModule) -> set:
    """Float dtypes of the graph's inputs: patterns are traced only for these."""
    found = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            found.add(v.dtype)
    return found


# ---- running rules over a graph -----------------------------------------------------------

def _candidates(gm: fx.GraphModule, targets) -> List[fx.Node]:
    targets = set(targets) if isinstance(targets, (list, tuple)) else {targets}
    return [n for n in reversed(gm.graph.nodes) if n.op == "call_function" and n.target in targets]


def _escaping_intermediate(m: pm.Match, outputs: Sequence[fx.Node]) -> Optional[fx.Node]:
    inside = set(m.nodes)
    for n in m.nodes:
        if n in outputs:
            continue
        if any(u not in inside for u in n.users):
            return n
    return None


def present_ops(gm: fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def searchable(rule: Rewrite, present: set) -> bool:
    """Whether the graph has every op the rule's pattern needs (else it cannot match: not traced)."""
    return all(t in present for t in rule.needs)


def _lacks_a_primitive(rule: Rewrite, present: set) -> bool:
    """The rule needs a `kunlun::` op the graph does not hold.  Canonicalisation never makes one, so this is
    known before it runs (unlike the ATen ops a rule needs, which it may spell differently)."""
    return any(getattr(op, "namespace", None) == "kunlun" and op not in present for op in rule.needs)


def apply_rewrites(gm: fx.GraphModule, rules: Sequence[Rewrite], fuses: bool = True) -> PassOutcome:
    """Apply `rules` in order (all matches of one rule before the next); count per family.  `fuses=False`:
    rules that make or remove primitives -- not fusions, so not limited by a bisect (`rewrites.py`)."""
    result = PassOutcome()
    present = present_ops(gm)
    if all(_lacks_a_primitive(rule, present) for rule in rules):
        # a stage that takes or puts back a primitive, when the graph holds none: no canonicalisation, no search
        if gm.graph.eliminate_dead_code():  # what the stage before left dead goes, as after any stage
            recompile(gm)
        return result
    try:
        _apply_rules(gm, rules, result, fuses)
    finally:
        _replacements.clear()  # traces are shared between the matches of one graph only (one fake mode)
    if result.matches and not _in_topological_order(gm.graph):
        # a replacement goes before the match's first output; an input computed later than
        # that output (but before the match's other nodes) is legal data flow in a new order
        legalize_graph(gm)  # copies every node: only when the order is actually broken
    gm.graph.eliminate_dead_code()
    recompile(gm)
    return result


def _apply_rules(gm: fx.GraphModule, rules: Sequence[Rewrite], result: PassOutcome, fuses: bool) -> None:
    canonicalize(gm)
    dtypes = graph_float_dtypes(gm)
    present, index = present_ops(gm), GraphIndex(gm)
    for rule in rules:
        if not searchable(rule, present):
            continue
        for compiled in _patterns_for(rule, dtypes, index):
            matches = result.matches
            _apply_one(gm, compiled, result, fuses)
            if result.matches != matches:  # replacements change the graph for the rules after
                present, index = present_ops(gm), GraphIndex(gm)


def _in_topological_order(graph: fx.Graph) -> bool:
    seen = set()
    for node in graph.nodes:
        if any(a not in seen for a in node.all_input_nodes):
            return False
        seen.add(node)
    return True


def _apply_one(gm: fx.GraphModule, c: CompiledRewrite, result: PassOutcome, fuses: bool = True) -> None:
    rule = c.rule
    label = f"{rule.family}/{rule.name}"
    for node in _candidates(gm, c.anchor_targets):
        if node._erased:
            continue
        m = c.strict.match(node)
        if not m:
            loose = c.relaxed.match(node)
            if loose:
                esc = _escaping_intermediate(loose, _match_outputs(loose))
                where = f" ({esc.name}, {esc.target})" if esc is not None else ""
                _note(result, f"{label}: an intermediate value{where} is used outside the pattern; "
                              f"fusing would compute it twice")
            continue
        unspelled = _unspelled_keyword(m) or _constant_input(m, c.tensor_names)
        if unspelled:
            _note(result, f"{label}: {unspelled}")
            continue
        bindings = Bindings(m, c.tensor_names)
        verdict = rule.guard(bindings)
        if isinstance(verdict, Refusal):
            _note(result, f"{label}: {verdict.reason}")
            for n in m.nodes:  # its near miss is said: later explanations leave these nodes alone
                n.meta[REFUSED] = label
            continue
        if fuses and not rewrite_allowed(f"{label} at {node.name}", m.nodes):
            continue
        params = {k: m.kwargs[k] for k in rule.constants}
        params.update(verdict)
        replacement = functools.partial(rule.replace, **params)
        uses = _uses_of(_match_outputs(m))
        m.replace_by_example(replacement, [m.kwargs[n] for n in c.tensor_names],
                             trace_fn=functools.partial(_trace_replacement, f"{label} {params!r}"))
        # a primitive rewritten again (partial rotary widened) keeps the rule that first spelled it
        _mark_replacements(uses, next((n.meta[MADE_BY] for n in m.nodes if MADE_BY in n.meta), rule.name))
        result.patterns[rule.family] = result.patterns.get(rule.family, 0) + 1
        result.matches += 1


# keywords that change where or how a result is laid out, never its values
_LAYOUT_KEYWORDS = frozenset({"memory_format", "layout", "device", "pin_memory", "non_blocking"})


def _unspelled_keyword(m: pm.Match) -> Optional[str]:
    """Why a match computes something else, or None.  Inductor's matcher ignores a node's keywords that the
    pattern's node does not spell: `F.gelu(x)`'s pattern matches `F.gelu(x, approximate="tanh")`,
    `a + b` matches `torch.add(a, b, alpha=2)`, `x.sum(-1)` matches `x.sum(-1, dtype=torch.float32)`.  A
    keyword the pattern leaves out must hold its default (or, `dtype`, be the input's own dtype)."""
    for pattern, node in m.ctx.pattern_to_node.items():
        if not isinstance(pattern, pm._TargetArgsExpr) or not isinstance(node, fx.Node) \
                or node not in m.nodes or not node.kwargs:
            continue
        schema = getattr(node.target, "_schema", None)
        defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()} if schema else {}
        for key, value in node.kwargs.items():
            if key in pattern.kwargs or key in _LAYOUT_KEYWORDS or (key in defaults and defaults[key] == value):
                continue
            if key == "dtype" and _input_dtypes(node) <= {value}:  # factories (no input), or a no-op dtype
                continue
            return f"{node.name} ({node.target}) has {key}={value!r}, which the pattern leaves at its default"
    return None


def _constant_input(m: pm.Match, tensor_names: Sequence[str]) -> Optional[str]:
    """A search function's tensor input bound to a number (`torch.sigmoid(x) * 2.0` against `sigmoid(g) * up`):
    the pattern's variable matches any argument, the rule is written for a tensor."""
    for name in tensor_names:
        value = m.kwargs.get(name)
        if not isinstance(value, fx.Node):
            return f"{name} is the number {value!r}, not a tensor"
    return None


def _input_dtypes(node: fx.Node) -> set:
    return {a.meta["val"].dtype for a in node.all_input_nodes
            if isinstance(a.meta.get("val"), torch.Tensor)}


_REPLACEMENTS_KEPT = 256
_replacements: "collections.OrderedDict[tuple, fx.GraphModule]" = collections.OrderedDict()


def _distinct(example_vals: Sequence[Any]) -> List[Any]:
    """One tensor object per input.  Nodes a replacement inserted from one cached trace share its value
    objects (two `kunlun::linear` outputs of equal shape hold the same fake tensor); traced as one object, two
    such inputs would become one placeholder -- a replacement reading `gate` where the model read `up`."""
    seen, out = set(), []
    for v in example_vals:
        if isinstance(v, torch.Tensor) and id(v) in seen:
            mode = getattr(v, "fake_mode", None)
            with mode if mode is not None else contextlib.nullcontext():
                v = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
        seen.add(id(v))
        out.append(v)
    return out


def _trace_replacement(rule_key: str, fn: Callable, example_vals: Sequence[Any]) -> fx.GraphModule:
    """The replacement traced for these inputs; every layer of a graph has the same static shapes, so one
    trace serves them all (inserting a replacement only reads its graph).  Symbolic sizes: traced each time."""
    example_vals = _distinct(example_vals)
    metas = []
    for v in example_vals:
        if not isinstance(v, torch.Tensor):
            return trace_aten(fn, example_vals)
        if not all(isinstance(d, int) for d in (*v.shape, *v.stride(), v.storage_offset())):
            return trace_aten(fn, example_vals)
        metas.append((tuple(v.shape), tuple(v.stride()), v.storage_offset(), v.dtype, str(v.device)))
    key = (rule_key, tuple(metas))
    if key not in _replacements:
        _replacements[key] = _record_or_trace(fn, example_vals)
        if len(_replacements) > _REPLACEMENTS_KEPT:
            _replacements.popitem(last=False)
    return _replacements[key]


def _record_or_trace(fn: Callable, example_vals: Sequence[Any],
                     traced_on: Optional[Sequence[Any]] = None) -> fx.GraphModule:
    """`fn`'s graph on fake inputs recorded by one dispatch mode (a third to a half of make_fx's time, the
    same graph: tests/test_replacement_trace.py), or traced by make_fx (on `traced_on`, else the same
    inputs) where the recorder cannot be faithful (mutations, symbolic sizes)."""
    try:
        gm = replacement_trace.record(fn, example_vals)
    except replacement_trace.Unrecordable:
        return trace_aten(fn, example_vals if traced_on is None else traced_on)
    canonicalize(gm)
    return gm


def _uses_of(outputs: Sequence[fx.Node]) -> List[Tuple[fx.Node, fx.Node, int]]:
    """(output, user, position among the user's flattened arguments) for every use of a match output."""
    return [(o, u, i) for o in outputs for u in o.users for i, a in enumerate(_flat_args(u)) if a is o]


def _mark_replacements(uses: Sequence[Tuple[fx.Node, fx.Node, int]], rule: str) -> None:
    """After a replacement, the node at each recorded argument position is what replaced that output."""
    for old, user, i in uses:
        new = _flat_args(user)[i]
        if isinstance(new, fx.Node) and new is not old:
            mark_replacement(old, new, rule)


def _flat_args(node: fx.Node) -> List[Any]:
    return pytree.tree_leaves((node.args, node.kwargs))


def _match_outputs(m: pm.Match) -> List[fx.Node]:
    outs = m.output_nodes()
    return [o for o in outs if o is not None]


def _note(result: PassOutcome, line: str) -> None:
    if line not in result.near_misses:
        result.near_misses.append(line)
