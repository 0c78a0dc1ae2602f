"""Schedule tuner on ``hw_model``'s ConvSpec / Tiling: search space, xgboost cost model, tuners,
measurement through the compiler's TIR path, JSON-lines records."""
from __future__ import annotations

from .measure import Measurer, builder_cycles, get_measure, tir_cycles
from .records import TuningRecordWarning, best_tiling, layer_key, load_records, make_record, save_records
from .search import GridTuner, RandomTuner, TuneResult, XGBTuner, make_tuner
from .space import (
    ConvSpec,
    Tiling,
    canonical,
    default_tiling,
    enumerate_space,
    shape_spec,
    tkey,
    tunable,
    why_invalid,
)
from .tune import conv_specs, tune_model

__all__ = [
    "ConvSpec", "GridTuner", "Measurer", "RandomTuner", "Tiling", "TuneResult", "TuningRecordWarning", "XGBTuner",
    "best_tiling", "builder_cycles", "canonical", "conv_specs", "default_tiling", "enumerate_space", "get_measure",
    "layer_key", "load_records", "make_record", "make_tuner", "save_records", "shape_spec", "tir_cycles", "tkey",
    "tunable", "tune_model", "why_invalid",
]
