"""Schedule tuner: search space, xgboost cost model, tuners, measurement and JSON-lines records."""
from __future__ import annotations

from .bridge import best_builder_tiling, to_builder_tiling
from .measure import Measurer, estimate_cycles
from .records import best_tiling, layer_key, load_records, save_records
from .search import GridTuner, RandomTuner, TuneResult, XGBTuner, make_tuner
from .space import ConvSpec, Tiling, default_tiling, enumerate_space, why_invalid
from .tune import tune_model

__all__ = [
    "ConvSpec", "GridTuner", "Measurer", "RandomTuner", "Tiling", "TuneResult", "XGBTuner", "best_builder_tiling",
    "best_tiling", "default_tiling", "enumerate_space", "estimate_cycles", "layer_key", "load_records",
    "make_tuner", "save_records", "to_builder_tiling", "tune_model", "why_invalid",
]
