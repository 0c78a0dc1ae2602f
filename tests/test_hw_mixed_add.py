"""Residual add with mixed input dtypes (uint8 ReLU branch + int8 shortcut) == hw_model.reference.add."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hw_model import reference as ref
from hw_model.functional import run_program
from hw_model.isa import AluAdd, Program
from hw_model.layer_specs import AddSpec, Tiling
from hw_model.layers_alu import build_add, pack_inputs, run_layer

DTYPES = ["int8", "uint8"]


def _act(rng, dt, shape):
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max + 1, shape).astype(dt)


def _zp(rng, dt):
    info = np.iinfo(dt)
    return int(rng.integers(info.min, info.max + 1))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31), a_dt=st.sampled_from(DTYPES), b_dt=st.sampled_from(DTYPES),
       out_dt=st.sampled_from(DTYPES), n=st.integers(1, 2), c=st.integers(1, 40), h=st.integers(1, 6),
       w=st.integers(1, 6), per_channel=st.booleans(), rows=st.integers(1, 60), nbuf=st.integers(1, 2))
def test_mixed_dtype_add_matches_reference(seed, a_dt, b_dt, out_dt, n, c, h, w, per_channel, rows, nbuf):
    rng = np.random.default_rng(seed)
    a, b = _act(rng, a_dt, (n, c, h, w)), _act(rng, b_dt, (n, c, h, w))
    shape = (c,) if per_channel else ()
    ma, mb = (rng.uniform(0.05, 2, shape).astype(np.float32) for _ in range(2))
    bias = rng.uniform(-20, 20, shape).astype(np.float32)
    info = np.iinfo(out_dt)
    lo = int(rng.integers(info.min, info.min + 30))
    hi = int(rng.integers(max(lo, info.max - 30), info.max + 1))
    spec = AddSpec(n, c, h, w, _zp(rng, a_dt), _zp(rng, b_dt), ma, mb, bias, lo, hi, a_dt, b_dt, out_dt)
    want = ref.add(a, spec.a_zp, ma, b, spec.b_zp, mb, bias, lo, hi, np.dtype(out_dt))
    got = run_layer(spec, a, b, tiling=Tiling(rows=rows, nbuf=nbuf))
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_program_records_operand_dtypes_and_round_trips_json():
    spec = AddSpec(1, 20, 3, 3, 7, -5, 0.5, 1.5, 2.0, a_dtype="uint8", b_dtype="int8")
    prog = build_add(spec)
    adds = [i for i in prog.instrs if isinstance(i, AluAdd)]
    assert adds and all((i.a_dtype, i.b_dtype) == ("uint8", "int8") for i in adds)
    again = Program.from_json(prog.to_json())
    assert [i.to_dict() for i in again.instrs] == [i.to_dict() for i in prog.instrs]


def test_alu_reads_bytes_with_the_declared_signedness():
    """A uint8 operand declared int8 in the instruction is read as the hardware would: 200 -> -56."""
    rng = np.random.default_rng(3)
    a = rng.integers(128, 256, (1, 16, 2, 2)).astype(np.uint8)
    b = np.zeros((1, 16, 2, 2), np.int8)
    spec = AddSpec(1, 16, 2, 2, 0, 0, 0.25, 1.0, 0.0, a_dtype="uint8")
    prog = build_add(spec)
    inputs = pack_inputs(prog, a, b)
    right = run_program(prog, inputs)["out"]
    for i in prog.instrs:
        if isinstance(i, AluAdd):
            i.a_dtype = "int8"
    wrong = run_program(prog, inputs)["out"]
    as_int8 = a.view(np.int8)
    assert np.array_equal(wrong.reshape(-1)[:4 * 16].reshape(4, 16),
                          ref.add(as_int8, 0, 0.25, b, 0, 1.0, 0.0, -128, 127).reshape(16, 4).T)
    assert not np.array_equal(right, wrong)


@pytest.mark.parametrize("field,value,match", [("a_dtype", "int16", "a_dtype"), ("b_dtype", "float32", "b_dtype")])
def test_bad_operand_dtype_in_program_is_rejected(field, value, match):
    prog = build_add(AddSpec(1, 16, 2, 2, 0, 0, 1.0, 1.0, 0.0))
    next(i for i in prog.instrs if isinstance(i, AluAdd)).__setattr__(field, value)
    with pytest.raises(ValueError, match=match):
        prog.validate()
