"""ISA: JSON round trip and every validation error path of Program.validate / from_json."""
import json

import numpy as np
import pytest

from hw_model.builder import ProgramBuilder
from hw_model.config import DEFAULT_CONFIG
from hw_model.functional import run_program
from hw_model.isa import Gemm, Load, Program, Region, mem_size
from hw_model.layer_specs import ConvSpec
from hw_model.layers import build_conv
from hw_model.layers_alu import pack_inputs


def _conv_prog():
    rng = np.random.default_rng(0)
    spec = ConvSpec(1, 20, 5, 5, 18, rng.integers(-8, 8, (18, 20, 3, 3)).astype(np.int8),
                    rng.uniform(0, 1e-2, 18).astype(np.float32), rng.uniform(-1, 1, 18).astype(np.float32),
                    pads=(1, 1, 1, 1), x_zp=2, isg_groups=rng.integers(0, 3, 20))
    return build_conv(spec), rng.integers(-128, 128, (1, 20, 5, 5)).astype(np.int8)


def test_json_round_trip_is_exact():
    prog, x = _conv_prog()
    text = prog.to_json()
    back = Program.from_json(text)
    assert back.instrs == prog.instrs
    assert back.meta == json.loads(json.dumps(prog.meta))
    for name, r in prog.regions.items():
        b = back.regions[name]
        assert (b.dtype, b.size, b.kind, b.addr) == (r.dtype, r.size, r.kind, r.addr)
        assert r.addr is not None and r.addr % 64 == 0
        assert (r.data is None and b.data is None) or np.array_equal(b.data, r.data)
    assert back.to_json() == text
    inp = pack_inputs(prog, x)
    assert np.array_equal(run_program(back, inp)["out"], run_program(prog, inp)["out"])
    assert "pickle" not in text


@pytest.mark.parametrize("text,match", [
    ("{not json", "not JSON"),
    ('{"isa_version": 99, "instrs": [], "regions": []}', "isa_version"),
    ('[1, 2]', "isa_version"),
    ('{"isa_version": 1, "instrs": [], "regions": []}', "got isa_version 1, expected 2"),
    ('{"instrs": [], "regions": []}', "got isa_version none, expected 2"),
    ('{"isa_version": 2, "instrs": [{"op": "JUMP"}], "regions": []}', "unknown opcode 'JUMP'"),
    ('{"isa_version": 2, "instrs": [{"op": "GEMM", "acc_addr": 0}], "regions": []}', "#0 \\(GEMM\\)"),
])
def test_from_json_errors(text, match):
    with pytest.raises(ValueError, match=match):
        Program.from_json(text)


def _small():
    b = ProgramBuilder(DEFAULT_CONFIG)
    b.alloc("x", "int8", 64, "input")
    b.alloc("out", "int8", 64, "output")
    b.const("c", np.ones(64, np.float32), "float32")
    b.load("x", 0, "spad", 0, 1, 1, 64, 0, 0, push_next=True)
    b.norm_act_quant(acc_addr=0, acc_stride=16, out_addr=64, out_stride=16, rows=4, cols=16, m_addr=0, b_addr=16,
                     lo=-128, hi=127, pop_prev=True, push_next=True)
    b.store(64, "out", 0, 1, 1, 64, 0, 0, pop_prev=True)
    return b.finish()


def test_small_program_is_valid():
    _small().validate()


def _mutate(attr_path, value):
    prog = _small()
    k, name = attr_path
    setattr(prog.instrs[k], name, value)
    return prog


@pytest.mark.parametrize("k,field,value,match", [
    (0, "dram_offset", -1, "#0 \\(LOAD\\): field dram_offset must be a non-negative int"),
    (0, "n2", 0, "field n2 must be a positive int"),
    (0, "n1", 1.5, "field n1 must be a positive int"),
    (0, "mem", "dram", "unknown memory 'dram'"),
    (0, "region", "nope", "unknown DRAM region 'nope'"),
    (0, "n2", 65, "DRAM address 64 out of range of region 'x'"),
    (0, "region", "c", "does not fit memory spad"),
    (0, "sram_addr", 512 * 1024, "dst overflows spad"),
    (0, "pop_prev", True, "load queue has no neighbour for pop_prev"),
    (2, "push_next", True, "store queue has no neighbour for push_next"),
    (2, "region", "c", "STORE into constant region"),
    (1, "out_dtype", "int16", "out_dtype must be int8 or uint8"),
    (1, "lo", -129, "clip bounds"),
    (1, "hi", 300, "clip bounds"),
    (1, "acc_addr", mem_size("acc", DEFAULT_CONFIG), "D2 overflows acc"),
    (1, "m_addr", 8192, "m overflows cbuf"),
    (1, "pop_prev", False, None),
    (2, "pop_prev", False, None),
])
def test_validation_errors(k, field, value, match):
    prog = _mutate((k, field), value)
    if match is None:
        prog.validate()  # fewer pops than pushes is not an error (tokens left over)
        return
    with pytest.raises(ValueError, match=match):
        prog.validate()


def test_token_deadlock_and_underflow():
    prog = _small()
    prog.instrs[0].push_next = False
    with pytest.raises(ValueError, match="deadlock.*compute queue waits at instruction #1"):
        prog.validate()
    prog = _small()
    prog.instrs[0].pop_next = True  # load waits for compute, compute waits for load
    with pytest.raises(ValueError, match="load queue waits at instruction #0"):
        prog.validate()


def test_gemm_and_gsa_field_errors():
    b = ProgramBuilder(DEFAULT_CONFIG)
    b.gemm(acc_addr=0, acc_stride=32, in_addr=0, in_row_stride=16, in_pix_stride=16, w_addr=0, w_row_stride=32,
           n_ob=2, n_cb=1, kh=1, kw=1, oh=1, ow=1, depthwise=True)
    with pytest.raises(ValueError, match="depthwise GEMM needs n_cb == n_ob"):
        b.finish()
    b = ProgramBuilder(DEFAULT_CONFIG)
    b.group_shift_add(d1_addr=0, d1_stride=16, d2_addr=16, d2_stride=16, rows=1, cols=16, sign=2, init=True)
    with pytest.raises(ValueError, match="sign 2 is not one of NPUConfig.isg_group_signs"):
        b.finish()
    b = ProgramBuilder(DEFAULT_CONFIG)
    b.gemm(acc_addr=0, acc_stride=16, in_addr=0, in_row_stride=16, in_pix_stride=16,
           w_addr=mem_size("wbuf", DEFAULT_CONFIG),
           w_row_stride=16, n_ob=1, n_cb=1, kh=1, kw=1, oh=1, ow=1)
    with pytest.raises(ValueError, match="weights overflows wbuf"):
        b.finish()


def test_region_and_instruction_errors():
    prog = _small()
    prog.regions["x"].dtype = "int4"
    with pytest.raises(ValueError, match="dtype 'int4'"):
        prog.validate()
    prog = _small()
    prog.regions["x"].kind = "weird"
    with pytest.raises(ValueError, match="kind 'weird'"):
        prog.validate()
    prog = _small()
    prog.regions["c"].data = None
    with pytest.raises(ValueError, match="const region needs data"):
        prog.validate()
    prog = _small()
    prog.instrs.append("NOP")
    with pytest.raises(ValueError, match="#3: not an NPU instruction"):
        prog.validate()
    with pytest.raises(TypeError, match="expected a Program"):
        from hw_model.isa import validate_program
        validate_program([], DEFAULT_CONFIG)


def test_builder_errors():
    b = ProgramBuilder(DEFAULT_CONFIG)
    b.alloc("x", "int8", 4)
    with pytest.raises(ValueError, match="allocated twice"):
        b.alloc("x", "int8", 4)
    with pytest.raises(ValueError, match="dtype 'int64'"):
        b.alloc("y", "int64", 4)
    with pytest.raises(ValueError, match="does not fit int8 exactly"):
        b.const("w", np.array([300]), "int8")
    with pytest.raises(TypeError, match="cfg must be an NPUConfig"):
        ProgramBuilder("cfg")
    with pytest.raises(ValueError, match="unknown memory"):
        mem_size("l2", DEFAULT_CONFIG)


def test_instruction_dataclasses_compare_and_serialise():
    a = Load("x", 0, "spad", 0, 1, 1, 16, 0, 0, pad_value=3)
    assert a == Load(**{k: v for k, v in a.to_dict().items() if k != "op"})
    assert Gemm.opcode == "GEMM" and Gemm.queue == "compute" and Load.queue == "load"
    r = Region("c", "float32", 2, "const", np.array([1.5, -2.0], np.float32))
    assert np.array_equal(Region.from_dict(json.loads(json.dumps(r.to_dict()))).data, r.data)


def test_isa_facade_reexports_instructions_and_program():
    import hw_model.instructions as ins_mod
    import hw_model.isa as isa
    import hw_model.program as prog_mod
    for name in isa.__all__:
        obj = getattr(isa, name)
        src = ins_mod if hasattr(ins_mod, name) else prog_mod
        assert getattr(src, name) is obj
    assert isa.OPCODES["ALU_ADD"] is isa.AluAdd and isa.Program.validate is prog_mod.Program.validate
