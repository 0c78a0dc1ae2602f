"""NPU regions: the functions ``MergeCompositeFunctions`` makes of neighbouring offloaded layers.

After the partition every ``Codegen="ioso_npu"`` function is a dataflow of composite calls, one per
layer. :func:`read_region` turns it into a :class:`Region`: its inputs, the layers in order with the
tensors each one reads (a region input or an earlier step's output) and the tensors it returns.
The runtime (:func:`target_npu.runtime.register_region`) runs the steps one layer program after the
other on the simulator; tensors between the steps stay on the NPU side (numpy arrays), the host
sees only the region's inputs and outputs. Regions are plain data (``to_dict`` / ``from_dict``) so
that a compiled artifact can register them again on another machine.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import relax


@dataclass(frozen=True)
class Step:
    """One layer of a region: ``layer`` index, its inputs as refs ``"in:<k>"`` or ``"step:<j>"``."""

    layer: int
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class Region:
    """A merged NPU function: ``symbol`` called by the VM with ``num_inputs`` tensors, then outputs."""

    symbol: str
    num_inputs: int
    steps: tuple[Step, ...]
    outputs: tuple[str, ...]

    @property
    def layers(self) -> list[int]:
        return [s.layer for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "num_inputs": self.num_inputs, "outputs": list(self.outputs),
                "steps": [{"layer": s.layer, "inputs": list(s.inputs)} for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Region:
        try:
            steps = tuple(Step(int(s["layer"]), tuple(str(r) for r in s["inputs"])) for s in d["steps"])
            region = cls(str(d["symbol"]), int(d["num_inputs"]), steps, tuple(str(r) for r in d["outputs"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed NPU region record {d!r}: {e}") from None
        region.check()
        return region

    def check(self) -> None:
        """Every ref names a region input or an earlier step (ValueError otherwise)."""
        for j, refs in enumerate([s.inputs for s in self.steps] + [self.outputs]):
            for r in refs:
                kind, _, k = r.partition(":")
                limit = {"in": self.num_inputs, "step": j}.get(kind)
                if limit is None or not k.isdigit() or int(k) >= limit:
                    raise ValueError(f"region {self.symbol}: step {j} reads {r!r}, which is not defined before it")


def _layer_calls(func: relax.Function, layer_of: Callable[[relax.Call], int]) -> list[tuple[int, relax.Call]]:
    out: list[tuple[int, relax.Call]] = []

    def visit(e: Any) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
            out.append((layer_of(e), e))

    relax.analysis.post_order_visit(func.body, visit)
    return out


def read_region(func: relax.Function, symbol: str, layer_of: Callable[[relax.Call], int]) -> Region:
    """The :class:`Region` of a merged ``Codegen="ioso_npu"`` function; ``layer_of`` maps the layer
    call inside a composite function to its layer index."""
    refs: dict[Any, str] = {p: f"in:{k}" for k, p in enumerate(func.params)}
    composites: dict[Any, relax.Function] = {}
    steps: list[Step] = []

    def ref(e: Any) -> str:
        if e not in refs:
            raise ValueError(f"NPU region {symbol}: operand {e} is neither a region input nor a layer output")
        return refs[e]

    for blk in func.body.blocks:
        for b in blk.bindings:
            v = b.value
            if isinstance(v, relax.Function):
                composites[b.var] = v
            elif isinstance(v, relax.Call) and v.op in composites:
                inner = composites[v.op]
                calls = _layer_calls(inner, layer_of)
                if len(calls) != 1:
                    raise ValueError(f"NPU region {symbol}: a composite holds {len(calls)} layers, expected 1")
                idx, call = calls[0]
                # the layer's operands, through the composite's parameters: a tensor read twice (x + x)
                # is one parameter of the composite but two operands of the layer
                params = {p: a for p, a in zip(inner.params, v.args)}
                operands = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
                refs[b.var] = f"step:{len(steps)}"
                steps.append(Step(idx, tuple(ref(params[o]) for o in operands if o in params)))
            elif isinstance(v, relax.Var):
                refs[b.var] = ref(v)
            elif not isinstance(v, relax.Tuple):  # a tuple binding is only read through the return value
                raise ValueError(f"NPU region {symbol}: unexpected binding {v}")
    body = func.body.body
    outs = body.fields if isinstance(body, relax.Tuple) else [body]
    region = Region(symbol, len(func.params), tuple(steps), tuple(ref(o) for o in outs))
    region.check()
    return region
