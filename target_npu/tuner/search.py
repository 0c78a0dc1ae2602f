"""Tuners behind one interface: xgboost + simulated annealing, random search, grid search.

``tuner.tune(n_trials)`` measures at most ``n_trials`` distinct valid tilings of one layer
(invalid points never reach the measurer) and returns a :class:`TuneResult`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
from tqdm import tqdm

from hw_model.config import NPUConfig

from .cost_model import XGBCostModel
from .features import FEATURE_NAMES, features
from .measure import Measurer
from .space import ConvSpec, Tiling, TKey, canonical, default_tiling, enumerate_space, tkey

SA_CHAINS = 16
"""Simulated-annealing chains per proposal round. Chosen: AutoTVM's SimulatedAnnealingOptimizer uses 128 on
spaces of 1e6+; our per-layer spaces have hundreds of points."""
SA_STEPS = 40
"""Steps per chain. Chosen: enough to cross every knob's value list a few times."""
DEFAULT_BATCH = 2
"""Measurements per model refit. Chosen (measured on the ResNet-18 layers with hw_model.cycles, 4 seeds):
batch 2 left the xgb tuner 1.8 % above the optimum on average, batch trials/5 (<= 8) 4.5 %."""
EPS_RANDOM = 0.1
"""Fraction of each batch drawn at random (exploration). Chosen: AutoTVM's eps-greedy default 0.05, rounded up."""


@dataclass
class TuneResult:
    """Measured history of one tuning run, in measurement order (cycles are core cycles)."""

    spec: ConvSpec
    tuner: str
    history: list[tuple[Tiling, int]] = field(default_factory=list)

    @property
    def best(self) -> tuple[Tiling, int]:
        if not self.history:
            raise ValueError("TuneResult.best: nothing was measured")
        return min(self.history, key=lambda h: h[1])

    def best_curve(self) -> list[int]:
        """Best cycles so far after each trial."""
        return list(np.minimum.accumulate([c for _, c in self.history]))


class Tuner:
    """Base class: subclasses implement :meth:`next_batch`."""

    name = "base"

    def __init__(self, spec: ConvSpec, cfg: NPUConfig, measurer: Measurer | None = None, seed: int = 0,
                 space: Sequence[Tiling] | None = None) -> None:
        self.spec, self.cfg = spec, cfg
        self.measurer = measurer if measurer is not None else Measurer(spec, cfg)
        self.space = list(space) if space is not None else enumerate_space(spec, cfg)
        if not self.space:
            raise ValueError(f"layer {spec} has no valid tiling on this NPUConfig")
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.measured: dict[TKey, int] = {}
        self.index = {tkey(t): i for i, t in enumerate(self.space)}

    def unmeasured(self) -> list[Tiling]:
        return [t for t in self.space if tkey(t) not in self.measured]

    def next_batch(self, k: int) -> list[Tiling]:
        raise NotImplementedError

    def update(self, tilings: Sequence[Tiling], cycles: Sequence[int]) -> None:
        self.measured.update(zip(map(tkey, tilings), cycles))

    def warm_start(self, tilings: Sequence[Tiling], cycles: Sequence[int]) -> int:
        """Take earlier measurements (e.g. tuning records) as done: they are never measured again and guide
        the search (the xgb model is fit on them). Points outside this layer's space are ignored.
        Returns how many were taken."""
        known = [(t, int(c)) for t, c in zip(tilings, cycles) if tkey(t) in self.index and tkey(t) not in self.measured]
        if known:
            ts, cs = [t for t, _ in known], [c for _, c in known]
            self.measurer.cache.update(zip(map(tkey, ts), cs))
            self.update(ts, cs)
        return len(known)

    def tune(self, n_trials: int, batch_size: int | None = None, progress: bool = False,
             desc: str | None = None, early_stopping: int | None = None) -> TuneResult:
        """Measure up to ``n_trials`` distinct new tilings (fewer if the space is smaller); with
        ``early_stopping`` N, stop once N measurements in a row found nothing better than the best so far
        (warm-start points included, as upstream AutoTVM's ``early_stopping``)."""
        if not isinstance(n_trials, int) or n_trials < 1:
            raise ValueError(f"n_trials must be a positive int, got {n_trials!r}")
        if early_stopping is not None and (not isinstance(early_stopping, int) or early_stopping < 1):
            raise ValueError(f"early_stopping must be a positive int or None, got {early_stopping!r}")
        n_trials = min(n_trials, len(self.space) - len(self.measured))
        best = min(self.measured.values(), default=None)
        since_best = 0
        bs = batch_size or DEFAULT_BATCH
        res = TuneResult(self.spec, self.name)
        with tqdm(total=n_trials, desc=desc or self.name, disable=not progress, leave=False) as bar:
            while len(res.history) < n_trials:
                batch = [t for t in self.next_batch(min(bs, n_trials - len(res.history)))
                         if tkey(t) not in self.measured]
                if not batch:
                    break
                cycles = self.measurer(batch)
                self.update(batch, cycles)
                res.history.extend(zip(batch, cycles))
                bar.update(len(batch))
                bar.set_postfix(best_cycles=res.best[1])
                stop = False
                for c in cycles:  # in measurement order: a later point of this batch does not undo a stop
                    if best is None or c < best:
                        best, since_best = c, 0
                    else:
                        since_best += 1
                    stop = stop or (early_stopping is not None and since_best >= early_stopping)
                if stop:
                    break
        return res


class RandomTuner(Tuner):
    """Uniform sampling without replacement."""

    name = "random"

    def next_batch(self, k: int) -> list[Tiling]:
        todo = self.unmeasured()
        idx = self.rng.choice(len(todo), size=min(k, len(todo)), replace=False)
        return [todo[i] for i in idx]


class GridTuner(Tuner):
    """Enumerates the space in its fixed order."""

    name = "grid"

    def next_batch(self, k: int) -> list[Tiling]:
        return self.unmeasured()[:k]


class XGBTuner(Tuner):
    """xgboost cost model refit after each batch; simulated annealing on its prediction proposes the next one."""

    name = "xgb"

    def __init__(self, *args, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kw)
        self.model = XGBCostModel(self.spec, self.cfg, seed=self.seed)
        # The space is enumerated, so features are computed once and predicted once per round;
        # the annealing then walks over the predictions (by point index).
        self.x = features(self.spec, self.space, self.cfg)
        self.pred = np.zeros(len(self.space))
        self.values = {f.name: sorted({getattr(t, f.name) for t in self.space}) for f in fields(Tiling)}

    def update(self, tilings: Sequence[Tiling], cycles: Sequence[int]) -> None:
        super().update(tilings, cycles)
        keys = list(self.measured)
        idx = [self.index[k] for k in keys]
        self.model.update([self.space[i] for i in idx], [self.measured[k] for k in keys], x=self.x[idx])
        self.pred = self.model.predict(self.space, x=self.x)

    def _neighbour(self, t: Tiling) -> Tiling:
        name = list(self.values)[self.rng.integers(len(self.values))]
        vals = self.values[name]
        i = vals.index(getattr(t, name)) + int(self.rng.choice((-1, 1)))
        return replace(t, **{name: vals[i % len(vals)]})

    def _anneal(self) -> dict[int, float]:
        """Visited valid points (index in the space) -> predicted log2 cycles, from SA chains seeded by the
        best measured points. A neighbour outside the valid space is not taken."""
        best = [self.index[k] for k in sorted(self.measured, key=self.measured.get)[: SA_CHAINS // 2]]
        cur = best + [int(i) for i in self.rng.integers(len(self.space), size=SA_CHAINS - len(best))]
        pred = self.pred
        cur_e = [pred[i] for i in cur]
        seen: dict[int, float] = dict(zip(cur, cur_e))
        for step in range(SA_STEPS):
            temp = max(1e-3, 1.0 - step / SA_STEPS)
            cand = [self.index.get(tkey(self._neighbour(self.space[i])), i) for i in cur]
            seen.update((c, pred[c]) for c in cand)
            for j, c in enumerate(cand):
                de = seen[c] - cur_e[j]
                if de <= 0 or self.rng.random() < math.exp(-de / (0.5 * temp)):
                    cur[j], cur_e[j] = c, seen[c]
        return seen

    def next_batch(self, k: int) -> list[Tiling]:
        todo = self.unmeasured()
        if not self.measured:
            # The default heuristic is the first candidate: a tuned schedule is never worse than it.
            d = self.index.get(tkey(canonical(self.spec, default_tiling(self.spec, self.cfg), self.cfg)))
            first = [] if d is None else [d]
            # Then the best points of the roofline feature (analytic prior), the rest random.
            prior = np.argsort(self.x[:, FEATURE_NAMES.index("log2_roofline_cycles")], kind="stable")
            n_prior = (k - len(first) + 1) // 2
            first += [int(i) for i in prior if int(i) not in first][:n_prior]
            rest = [i for i in range(len(self.space)) if i not in first]
            idx = self.rng.choice(len(rest), size=min(k - len(first), len(rest)), replace=False)
            return [self.space[i] for i in first + [rest[j] for j in idx]]
        if self.model.booster is None:
            idx = self.rng.choice(len(todo), size=min(k, len(todo)), replace=False)
            return [todo[i] for i in idx]
        seen = self._anneal()
        ranked = [i for i in sorted(seen, key=seen.get) if tkey(self.space[i]) not in self.measured]
        n_rand = int(self.rng.binomial(k, EPS_RANDOM))
        # Diversity: one candidate per predicted value (knobs the model cannot tell apart are tried later).
        batch, preds = [], set()
        for i in ranked:
            if len(batch) == k - n_rand:
                break
            p = round(float(seen[i]), 6)
            if p not in preds:
                batch.append(self.space[i])
                preds.add(p)
        chosen = {tkey(t) for t in batch}
        rest = [t for t in todo if tkey(t) not in chosen]
        while len(batch) < k and rest:
            batch.append(rest.pop(int(self.rng.integers(len(rest)))))
        return batch


TUNERS = {"xgb": XGBTuner, "random": RandomTuner, "grid": GridTuner}
ALIASES = {"gridsearch": "grid"}
"""Upstream tvmc's tuner names -> ours (``tvmc tune --tuner gridsearch``)."""


def tuner_name(kind: str) -> str:
    """The tuner a name (ours or upstream's alias) means; ValueError listing the valid names."""
    name = ALIASES.get(kind, kind)
    if name not in TUNERS:
        raise ValueError(f"tuner must be one of {sorted(set(TUNERS) | set(ALIASES))}, got {kind!r}")
    return name


def make_tuner(kind: str, spec: ConvSpec, cfg: NPUConfig, measurer: Measurer | None = None,
               seed: int = 0) -> Tuner:
    """A tuner by name: "xgb", "random", "grid" (or upstream's "gridsearch")."""
    return TUNERS[tuner_name(kind)](spec, cfg, measurer=measurer, seed=seed)
