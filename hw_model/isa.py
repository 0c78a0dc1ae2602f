"""The NPU instruction set (facade): instructions from ``hw_model.instructions``, the Program
container and its validation from ``hw_model.program``. See ``docs/isa.md``."""
from __future__ import annotations

from hw_model.instructions import (
    BLOCK,
    DTYPES,
    MEMS,
    OPCODES,
    AluAdd,
    AluMax,
    AluSum,
    Gemm,
    GroupShiftAdd,
    Instr,
    Load,
    NormActQuant,
    Store,
    Sync,
    mem_size,
)
from hw_model.program import ISA_VERSION, Program, Region, check_tokens, validate_program

__all__ = ["BLOCK", "DTYPES", "MEMS", "OPCODES", "ISA_VERSION", "AluAdd", "AluMax", "AluSum", "Gemm",
           "GroupShiftAdd", "Instr", "Load", "NormActQuant", "Store", "Sync", "mem_size", "Program", "Region",
           "check_tokens", "validate_program"]
