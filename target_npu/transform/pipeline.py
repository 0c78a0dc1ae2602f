"""The NPU part of ``compile(target="ioso_npu")`` as a TVM pass pipeline a user can print, reorder and extend.

Three ``tvm.transform`` module passes share one :class:`NPUCompileState` (one per compile):

1. :func:`FoldQDQ` (``ioso_npu.FoldQDQ``): ``find_layers`` + ``fold_qdq``: QDQ chains -> the layers'
   integer forms (``target_npu.integer_ops``); fills ``state.layers`` / ``state.fallbacks``.
2. :func:`PlanGroupPermutation` (``ioso_npu.PlanGroupPermutation``): ``plan_permutations`` +
   ``apply_plan`` (ISG groups made contiguous); fills ``state.plan`` / ``state.permutes``, replaces
   ``state.layers`` by the permuted layers and re-emits their integer forms with the permuted
   constants (a producer writes its channels in the order its consumers read them).
3. :func:`PartitionForNPU` (``ioso_npu.PartitionForNPU``): ``target_npu.partition.partition`` with a
   :class:`PartitionContext` (``state.ctx``): NPU regions ``<prefix>.npu.r<k>``, CPU layers ``<prefix>.<i>``.

:func:`npu_pipeline` chains them in a ``tvm.transform.Sequential`` named ``ioso_npu.pipeline``::

    state = NPUCompileState(config, prefix, {"input"}, {"*": 8})
    seq = tvm.transform.Sequential([npu_pipeline(state), my_pass])   # my_pass sees the partitioned module
    mod = seq(mod)

Each pass checks the state: a pass whose prerequisite has not run, or that already ran on this
state, raises a ValueError naming the pass to run (the layers of a state belong to one module).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import tvm

from hw_model.config import NPUConfig
from target_npu import runtime
from target_npu.integer_ops import emit_layer, rewrite_layers
from target_npu.partition import layers_to_cpu, partition
from target_npu.patterns import PartitionContext
from target_npu.transform.fold_qdq import find_layers, fold_qdq
from target_npu.transform.permute_groups import Plan, apply_plan, external_tensors, plan_permutations

FOLD, PLAN, PARTITION, PIPELINE = ("ioso_npu.FoldQDQ", "ioso_npu.PlanGroupPermutation",
                                   "ioso_npu.PartitionForNPU", "ioso_npu.pipeline")


@dataclass
class NPUCompileState:
    """What the NPU passes share (one per compile): inputs set by the caller, results filled by the passes."""

    config: NPUConfig
    prefix: str  # runtime function prefix, "ioso_npu.m<hash>" in compile()
    input_names: set[str]
    wbits: dict  # weight bits per layer name ("*": default), as compile() passes to find_layers
    offload: bool = True  # False: no partition, every layer on the CPU (compile(offload=False))
    permute: bool = True  # False: planner off, empty Plan(): no producer permuted (consumers gather)
    tilings_of: Callable[[list], list] | None = None  # layers -> per-layer Tiling list (None: all None)
    ctx_options: dict = field(default_factory=dict)  # further PartitionContext keyword arguments
    # filled by the passes:
    layers: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    plan: Plan | None = None
    permutes: dict = field(default_factory=dict)  # plan.counts()
    ctx: PartitionContext | None = None
    ran: list[str] = field(default_factory=list)  # names of the passes that ran on this state, in order


def _check(state: NPUCompileState, name: str, needs: tuple[str, ...] = (), before: tuple[str, ...] = ()) -> None:
    """ValueError unless ``name`` may run now on ``state`` (each pass records itself once it succeeded)."""
    if not isinstance(state, NPUCompileState):
        raise TypeError(f"{name}: state must be an NPUCompileState, got {type(state).__name__}")
    if name in state.ran:
        raise ValueError(f"{name} already ran on this NPUCompileState (passes so far: {state.ran}); "
                         f"make one state per compile")
    for need in needs:
        if need not in state.ran:
            raise ValueError(f"{name} needs {need}: run {need} first (passes so far: {state.ran})")
    for later in before:
        if later in state.ran:
            raise ValueError(f"{name} must run before {later}, which already ran (passes so far: {state.ran})")


def FoldQDQ(state: NPUCompileState) -> tvm.transform.Pass:
    """``ioso_npu.FoldQDQ``: fold the QDQ chains of ``main`` into integer layer markers."""

    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        _check(state, FOLD)
        state.layers, state.fallbacks = find_layers(mod, state.config, state.wbits)
        mod = fold_qdq(mod, state.layers, state.prefix, state.config)
        state.ran.append(FOLD)
        return mod

    return tvm.transform.module_pass(run, opt_level=0, name=FOLD)


def PlanGroupPermutation(state: NPUCompileState) -> tvm.transform.Pass:
    """``ioso_npu.PlanGroupPermutation``: plan the channel orders and permute the layers' constants.

    Raises ValueError when a layer has more than one ISG group that is not a multiple of the
    granularity. ``state.permute`` False: the planner is off, an empty ``Plan()`` (no producer
    permuted, consumers gather their groups, counts 0, no granularity check), as compile() does.
    """

    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        _check(state, PLAN, needs=(FOLD,), before=(PARTITION,))
        cfg, layers = state.config, state.layers
        plan = plan_permutations(layers, external_tensors(mod, layers), set(state.input_names), cfg) \
            if state.permute else Plan()
        if plan.granularity_violations:
            raise ValueError(f"layers {plan.granularity_violations}: more than one ISG group is not a multiple "
                             f"of the granularity {cfg.granularity}")
        state.plan, state.layers, state.permutes = plan, apply_plan(layers, plan), plan.counts()
        changed = {i for i, (a, b) in enumerate(zip(layers, state.layers)) if a.spec is not b.spec}
        if changed:  # the permuted layers' integer forms get the permuted constants
            mod = rewrite_layers(mod, state.layers, lambda i, ly, ops, emit: emit_layer(emit, ly, ops, cfg), changed)
        state.ran.append(PLAN)
        return mod

    return tvm.transform.module_pass(run, opt_level=0, name=PLAN)


def PartitionForNPU(state: NPUCompileState) -> tvm.transform.Pass:
    """``ioso_npu.PartitionForNPU``: offload the layers passing the NPU checks into ``<prefix>.npu.r<k>`` regions.

    ``state.offload`` False puts every layer on the CPU (``layers_to_cpu``) and records every non-input
    layer in ``ctx.rejected`` with the reason ``"offload=False"``.
    """

    def run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        _check(state, PARTITION, needs=(FOLD,))
        layers = state.layers
        tilings = state.tilings_of(layers) if state.tilings_of is not None else [None] * len(layers)
        if len(tilings) != len(layers):
            raise ValueError(f"{PARTITION}: tilings_of gave {len(tilings)} tilings for {len(layers)} layers")
        state.ctx = ctx = PartitionContext(layers, state.config, list(tilings),
                                                **{"profile": runtime.Profile(), **state.ctx_options})
        if not state.offload:
            ctx.rejected.update({i: "offload=False" for i, ly in enumerate(layers) if ly.kind != "input"})
            mod = layers_to_cpu(mod, layers, state.prefix, set(ctx.rejected))
        else:
            mod = partition(mod, ctx, state.prefix)
        state.ran.append(PARTITION)
        return mod

    return tvm.transform.module_pass(run, opt_level=0, name=PARTITION)


def npu_pipeline(state: NPUCompileState) -> tvm.transform.Sequential:
    """``ioso_npu.pipeline``: FoldQDQ -> PlanGroupPermutation -> PartitionForNPU on ``state``."""
    return tvm.transform.Sequential([FoldQDQ(state), PlanGroupPermutation(state), PartitionForNPU(state)],
                                    opt_level=0, name=PIPELINE)


def pass_names(p: tvm.transform.Pass) -> list[str]:
    """Names of the passes ``p`` runs, in order (a Sequential flattened)."""
    if isinstance(p, tvm.transform.Sequential):
        return [n for q in p.passes for n in pass_names(q)]
    return [str(p.info.name)]
