"""xgboost cost model trained online on measured schedules (``xgboost.train``, regression on log2 cycles)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xgboost as xgb

from hw_model.config import NPUConfig

from .features import FEATURE_NAMES, features
from .space import ConvSpec, Tiling

XGB_PARAMS = {
    "objective": "reg:squarederror",
    "max_depth": 6,
    "eta": 0.3,
    "subsample": 1.0,
    "min_child_weight": 1,
    "nthread": 1,
}
"""Chosen: xgboost's defaults (depth 6, eta 0.3), one thread per model (the tuner runs several layers)."""
NUM_ROUNDS = 60
"""Boosting rounds per refit. Chosen: AutoTVM-sized (its XGBoostCostModel fits ~hundreds); small data here."""


class XGBCostModel:
    """Predicts log2(cycles) of tilings of one layer; refit from scratch on every :meth:`update`."""

    def __init__(self, spec: ConvSpec, cfg: NPUConfig, seed: int = 0) -> None:
        self.spec, self.cfg, self.seed = spec, cfg, seed
        self.booster: xgb.Booster | None = None

    def update(self, tilings: Sequence[Tiling], cycles: Sequence[int]) -> None:
        """Fit on all measurements so far (cycles > 0)."""
        if len(tilings) != len(cycles) or not tilings:
            raise ValueError(f"update needs equal, non-empty tilings/cycles, got {len(tilings)}/{len(cycles)}")
        y = np.log2(np.asarray(cycles, dtype=np.float64))
        d = xgb.DMatrix(features(self.spec, tilings, self.cfg), label=y, feature_names=list(FEATURE_NAMES))
        self.booster = xgb.train({**XGB_PARAMS, "seed": self.seed}, d, num_boost_round=NUM_ROUNDS)

    def predict(self, tilings: Sequence[Tiling]) -> np.ndarray:
        """Predicted log2(cycles), float64, shape (len(tilings),); zeros before the first update."""
        if self.booster is None:
            return np.zeros(len(tilings))
        d = xgb.DMatrix(features(self.spec, tilings, self.cfg), feature_names=list(FEATURE_NAMES))
        return self.booster.predict(d).astype(np.float64)
