"""NPU regions: the functions ``MergeCompositeFunctions`` makes of neighbouring offloaded layers.

After the partition every ``Codegen="ioso_npu"`` function is a dataflow of composite calls, one per
layer. :func:`read_region` turns it into a :class:`Region`: its inputs, the layers in order with the
tensors each one reads (a region input or an earlier step's output) and the tensors it returns.
``target_npu.link`` links the steps into the region's one instruction stream. Regions are plain
data (``to_dict`` / ``from_dict``) so that a compiled artifact can register them again elsewhere.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvm import relax

from target_npu.integer_ops import bindings_of, layer_name_of, operands_of


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


def read_region(func: relax.Function, symbol: str, index_of_name: Callable[[str], int],
                num_inputs: Callable[[int], int]) -> Region:
    """The :class:`Region` of a merged ``Codegen="ioso_npu"`` function. Each composite function inside
    holds one layer in its integer form (``target_npu.integer_ops``): ``index_of_name`` maps the layer
    name read from it to the layer index, ``num_inputs`` the index to the number of operands."""
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
                try:
                    name = layer_name_of(inner)
                    idx = index_of_name(name)
                    operands = operands_of(bindings_of(inner), name, num_inputs(idx))
                except ValueError as e:
                    raise ValueError(f"NPU region {symbol}: {e}") from None
                # the layer's operands, through the composite's parameters: a tensor read twice (x + x)
                # is one parameter of the composite but two operands of the layer
                params = {p: a for p, a in zip(inner.params, v.args)}
                refs[b.var] = f"step:{len(steps)}"
                steps.append(Step(idx, tuple(ref(params[o]) for o in operands)))
            elif isinstance(v, relax.Var):
                refs[b.var] = ref(v)
            elif not isinstance(v, relax.Tuple):  # a tuple binding is only read through the return value
                raise ValueError(f"NPU region {symbol}: unexpected binding {v}")
    body = func.body.body
    outs = body.fields if isinstance(body, relax.Tuple) else [body]
    region = Region(symbol, len(func.params), tuple(steps), tuple(ref(o) for o in outs))
    region.check()
    return region
