"""Block-reconstruction engine shared by AdaRound, BRECQ, QDrop and IOSO (IOSO Algorithm 1).

Per block, in program order: cache the block's float input, quantized input and float output
for all calibration samples (the program runs only up to the block: early stop), spill the
caches to disk above ``CalibConfig.memory_budget_mb``; weight step (AdaRound V, ISG logits R,
OSO) with the annealed regulariser, ISG hardening, fine-tuning; activation step (LSQ step
sizes and OSO); then the block's quantized output becomes the next block's input.

With ``CalibConfig.checkpoint_dir`` every finished block writes ``block<i>.pt`` (the model's
tensors, the generator state and the rounding modes; no pickled objects) tagged with a
fingerprint of the run; a new run with the same fingerprint loads the last one, recomputes the
caches by forward passes and goes on with the next block.

Device (``CalibConfig.device``): the model, the in-memory caches and the optimiser state live on it;
spilled caches stay on disk and are moved per mini-batch. Checkpoints hold CPU tensors and are loaded
with ``map_location="cpu"``, so a run resumes on any device. The batch order comes from a CPU
generator (the one state a checkpoint keeps); QDrop masks are drawn on the device, on a non-CPU device
from a generator seeded per iteration by the CPU one.

``Engine.history[block name]`` (kept as ``QuantModel.calib_history``): ``rec_loss_before`` / ``rec_loss_after``
(the block's loss on its first ``batch_size`` cached samples, every quantizer on, before the weight step and
after the activation step), ``weight_rec_loss`` / ``act_rec_loss`` (last iteration's mini-batch) and
``weight_step_s``.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .device import resolve_device
from .methods import CalibConfig, MethodSpec
from .qmodel import Block, QuantModel, _find_blocks
from .qmodules import QLayer

log = logging.getLogger("ioso_tvm.calib")


class TensorCache:
    """N samples of one float32 tensor kept in memory on ``device``, or in a ``np.memmap`` file when
    ``spill_to`` is given (rows read by ``[idx]`` are then moved to ``device``)."""

    def __init__(self, t: torch.Tensor, spill_to: Path | None = None, device: torch.device | None = None) -> None:
        self.device = t.device if device is None else torch.device(device)
        if spill_to is None:
            self.data, self.mm = t.to(self.device).contiguous(), None
        else:
            self.mm = np.memmap(spill_to, np.float32, "w+", shape=tuple(t.shape))
            self.mm[:] = t.detach().cpu().numpy()
            self.mm.flush()
            self.data = None

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (int64 (B,), any device) on the cache's device."""
        if self.data is not None:
            return self.data[idx.to(self.device)]
        idx = idx.cpu().numpy()
        rows = torch.from_numpy(np.ascontiguousarray(self.mm[np.sort(idx)]))[
            torch.from_numpy(np.argsort(np.argsort(idx)))]
        return rows.to(self.device)

    def full(self) -> torch.Tensor:
        """All rows: on the device when in memory, a CPU view of the file when spilled."""
        return self.data if self.data is not None else torch.from_numpy(np.asarray(self.mm))


def rec_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """BRECQ ``lp_loss`` (p = 2): squared error summed over channels, mean over the rest."""
    d = (pred - tgt).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def beta_at(it: int, iters: int, cfg: CalibConfig) -> float | None:
    """Regulariser beta at iteration ``it``: None during warm-up, then linear start -> end (AdaRound)."""
    warm = int(cfg.warmup * iters)
    if it < warm:
        return None
    frac = (it - warm) / max(iters - warm, 1)
    return cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * max(0.0, 1 - frac)


class Engine:
    """Runs the reconstruction of every block of ``qm`` for method ``spec``."""

    def __init__(self, qm: QuantModel, spec: MethodSpec, cfg: CalibConfig) -> None:
        if cfg.lr_isg is None or cfg.lr_oso_act is None:  # ``calibrate`` resolves the schedule rules
            raise ValueError("Engine needs CalibConfig.lr_isg and lr_oso_act resolved (calibrate() does this)")
        self.qm, self.spec, self.cfg = qm, spec, cfg
        self.device = resolve_device(cfg.device)
        qm.to(self.device)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # CPU: batch order (and masks on the CPU)
        self.mask_gen = None if self.device.type == "cpu" else torch.Generator(self.device)
        self.blocks = qm.blocks if spec.blocks == "block" else _find_blocks(
            qm.program, [""] * len(qm.program), dict(qm.ops))
        self.spill = None
        self.history: dict[str, dict[str, float]] = {}
        self.bar = tqdm(disable=True)  # one bar over all blocks, made by run()

    # --------------------------------------------------------------------------- caching
    def _cache(self, t: torch.Tensor, tag: str) -> TensorCache:
        mb = t.numel() * 4 / 2**20
        if mb <= self.cfg.memory_budget_mb / 3:
            return TensorCache(t, device=self.device)
        try:
            if self.spill is None:
                self.spill = Path(self.cfg.spill_dir or tempfile.mkdtemp(prefix="ioso_calib_"))
                self.spill.mkdir(parents=True, exist_ok=True)
            return TensorCache(t, self.spill / f"{tag}.f32", self.device)
        except OSError as e:
            raise MemoryError(f"a calibration cache of {mb:.0f} MiB is over CalibConfig.memory_budget_mb / 3 "
                              f"({self.cfg.memory_budget_mb / 3:.0f} MiB) and cannot be spilled to {self.spill} "
                              f"({e}); free disk space there, set CalibConfig.spill_dir, or use fewer "
                              f"num_samples") from e

    @torch.no_grad()
    def _run_block(self, block: Block, x: torch.Tensor, quant: bool) -> torch.Tensor:
        outs = []
        for i in range(0, x.shape[0], 64):
            env = self.qm.run({block.inp: x[i:i + 64].to(self.device)}, block.start, block.stop, quant=quant)
            outs.append(env[block.out])
        return torch.cat(outs)

    def _forward(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        return self.qm.run({block.inp: x}, block.start, block.stop)[block.out]

    # --------------------------------------------------------------------------- driver
    def run(self, data: torch.Tensor) -> None:
        fp_in = q_in = self._cache(data, "input")
        start = self._resume(data)
        for bi in range(start):  # caches of the finished blocks: forward passes only
            block = self.blocks[bi]
            target = self._cache(self._run_block(block, fp_in.full(), quant=False), f"b{bi}_fp")
            q_in = self._cache(self._run_block(block, q_in.full(), quant=True), f"b{bi}_q")
            fp_in = target
        todo = self.blocks[start:]
        total = sum(self._iterations(b) for b in todo)
        # one bar with an ETA over every block; where stderr is no terminal (CI, a log file), a log line per
        # block instead of carriage-return redraws
        tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=f"{self.spec.name}", unit="it", disable=not (self.cfg.progress and tty),
                        dynamic_ncols=True)
        t0 = time.perf_counter()
        for bi, block in enumerate(todo, start):
            self.bar.set_description(f"{self.spec.name} {block.name} ({bi + 1}/{len(self.blocks)})")
            target = self._cache(self._run_block(block, fp_in.full(), quant=False), f"b{bi}_fp")
            self.calibrate_block(block, q_in, fp_in, target)
            q_out = self._run_block(block, q_in.full(), quant=True)
            fp_in, q_in = target, self._cache(q_out, f"b{bi}_q")
            self._checkpoint(bi, data)
            if self.cfg.progress and not tty:
                done = sum(self._iterations(b) for b in todo[:bi - start + 1])
                spent = time.perf_counter() - t0
                eta = spent * (total - done) / done if done else 0.0
                h = self.history.get(block.name, {})
                log.info("calibrated block %s (%d/%d): rec loss %.4g -> %.4g, %.0f s, ETA %.0f s", block.name,
                         bi + 1, len(self.blocks), h.get("rec_loss_before", float("nan")),
                         h.get("rec_loss_after", float("nan")), spent, eta)
        self.bar.close()

    def _iterations(self, block: Block) -> int:
        """Optimiser steps of ``block`` (weight and activation step), for the progress bar."""
        cfg, spec = self.cfg, self.spec
        if not spec.adaround:
            return 0
        return (cfg.iters if self._layers(block) and cfg.iters > 0 else 0) + \
            (cfg.act_iters if self._quantizers(block) and cfg.act_iters > 0 else 0)

    # --------------------------------------------------------------------------- checkpoints
    def _fingerprint(self, data: torch.Tensor) -> str:
        """What must match to resume: method, settings, model structure and calibration data."""
        h = hashlib.sha256(repr((self.spec, {k: v for k, v in vars(self.cfg).items()
                                             if k not in ("progress", "checkpoint_dir", "spill_dir", "device")},
                                 [b.name for b in self.blocks],
                                 [(n, m.bits) for n, m in self.qm.named_modules() if hasattr(m, "bits")],
                                 sorted((k, tuple(v.shape)) for k, v in self.qm.state_dict().items()
                                        if not k.endswith(".wq.v"))  # v exists once a block is calibrated
                                 )).encode())
        h.update(data.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _checkpoint(self, bi: int, data: torch.Tensor) -> None:
        if self.cfg.checkpoint_dir is None:
            return
        folder = Path(self.cfg.checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        modes = {name: m.wq.mode for name, m in self.qm.ops.items() if isinstance(m, QLayer)}
        state = {"fingerprint": self._fingerprint(data), "block": bi, "generator": self.gen.get_state(),
                 "modes": modes, "history": self.history,
                 "model": {k: v.detach().cpu().clone() for k, v in self.qm.state_dict().items()}}
        tmp = folder / f"block{bi:04d}.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / f"block{bi:04d}.pt")

    def _resume(self, data: torch.Tensor) -> int:
        """Load the last finished block's checkpoint; returns the index of the next block (0: none)."""
        if self.cfg.checkpoint_dir is None:
            return 0
        files = sorted(Path(self.cfg.checkpoint_dir).glob("block*.pt"))
        if not files:
            return 0
        try:
            state = torch.load(files[-1], map_location="cpu", weights_only=True)  # saved on any device
        except Exception as e:  # a truncated or foreign file: say which one
            raise ValueError(f"checkpoint {files[-1]} cannot be read ({e}); delete it to restart that block") from e
        if state.get("fingerprint") != self._fingerprint(data):
            raise ValueError(f"checkpoint_dir {self.cfg.checkpoint_dir!r} holds a calibration of another model, "
                             f"data or settings; use an empty folder")
        for name, m in self.qm.ops.items():
            key = f"ops.{name}.wq.v"
            if isinstance(m, QLayer) and key in state["model"] and m.wq.v is None:
                m.wq.v = torch.nn.Parameter(torch.zeros_like(state["model"][key], device=self.device))
        self.qm.load_state_dict(state["model"])
        for name, mode in state["modes"].items():
            self.qm.ops[name].wq.mode = mode
        self.gen.set_state(state["generator"])
        self.history.update(state["history"])
        return int(state["block"]) + 1

    def _layers(self, block: Block) -> list[QLayer]:
        return [self.qm.ops[k] for k in (st.op for st in self.qm.program[block.start:block.stop])
                if isinstance(self.qm.ops[k], QLayer)]

    def _quantizers(self, block: Block):
        return [self.qm.ops[st.op].outq for st in self.qm.program[block.start:block.stop]
                if hasattr(self.qm.ops[st.op], "outq")]

    def _batch(self, q_in: TensorCache, fp_in: TensorCache, target: TensorCache) -> tuple[torch.Tensor, torch.Tensor]:
        n = target.full().shape[0]
        idx = torch.randperm(n, generator=self.gen)[: self.cfg.batch_size]
        x = q_in[idx]
        if self.spec.qdrop:  # QDrop: keep the float input element-wise with probability drop_prob
            keep = self._uniform(x.shape) < self.cfg.drop_prob
            x = torch.where(keep, fp_in[idx], x)
        return x, target[idx]

    def _uniform(self, shape: torch.Size) -> torch.Tensor:
        """U[0, 1) float32 of ``shape`` on the device: from the CPU generator on the CPU, else from the
        device generator seeded with a number the CPU generator draws (no device state to checkpoint)."""
        if self.mask_gen is None:
            return torch.rand(shape, generator=self.gen)
        self.mask_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.gen)))
        return torch.rand(shape, generator=self.mask_gen, device=self.device)

    def calibrate_block(self, block: Block, q_in: TensorCache, fp_in: TensorCache, target: TensorCache) -> None:
        """Algorithm 1 for one block: weight step (V, R, OSO) then activation step (step sizes, OSO)."""
        cfg, spec = self.cfg, self.spec
        layers = self._layers(block)
        quantizers = self._quantizers(block)
        hist = self.history.setdefault(block.name, {})
        hist["rec_loss_before"] = self._fixed_loss(block, q_in, target)
        if spec.adaround and layers and cfg.iters > 0:
            for q in quantizers:
                q.enabled = spec.qdrop
            self._weight_step(block, layers, q_in, fp_in, target, hist)
            for q in quantizers:
                q.enabled = True
        for layer in layers:
            layer.wq.mode = "hard" if layer.wq.v is not None else "nearest"
            if not layer.isg.hard:
                layer.isg.harden(cfg.granularity)
        if spec.adaround and cfg.act_iters > 0 and quantizers:
            self._act_step(block, layers, quantizers, q_in, fp_in, target, hist)
        hist["rec_loss_after"] = self._fixed_loss(block, q_in, target)

    @torch.no_grad()
    def _fixed_loss(self, block: Block, q_in: TensorCache, target: TensorCache) -> float:
        """``rec_loss`` of the block as it stands (every quantizer on) on the first ``batch_size`` cached
        samples; draws nothing from the generator, so the calibration itself is unchanged."""
        idx = torch.arange(min(self.cfg.batch_size, target.full().shape[0]))
        return float(rec_loss(self._forward(block, q_in[idx]), target[idx]))

    def _weight_step(self, block, layers, q_in, fp_in, target, hist) -> None:
        cfg, spec = self.cfg, self.spec
        groups = [{"params": [], "lr": cfg.lr_round}, {"params": [], "lr": cfg.lr_isg},
                  {"params": [], "lr": cfg.lr_oso}]
        for layer in layers:
            layer.wq.init_adaround(layer.weight)
            groups[0]["params"].append(layer.wq.v)
            if spec.isg and not layer.depthwise and layer.in_channels > 1:
                layer.isg.init_soft()
                groups[1]["params"].append(layer.isg.r)
            if spec.oso:
                groups[2]["params"] += [layer.oso_scale, layer.oso_offset]
        opt = torch.optim.Adam([g for g in groups if g["params"]])
        harden_it = int(cfg.harden_at * cfg.iters) if spec.isg else cfg.iters + 1
        t0 = time.perf_counter()
        for it in range(cfg.iters):
            if it == harden_it:
                for layer in layers:
                    if not layer.isg.hard:
                        layer.isg.harden(cfg.granularity)
            x, y = self._batch(q_in, fp_in, target)
            rec = rec_loss(self._forward(block, x), y)
            loss = rec
            beta = beta_at(it, cfg.iters, cfg)
            if beta is not None:
                reg = sum(layer.wq.round_reg(beta) + layer.isg.reg(beta) for layer in layers)
                loss = loss + cfg.reg_weight * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for layer in layers:
                layer.isg.track(it)
            self.bar.update(1)
            if it % 50 == 0 or it == cfg.iters - 1:
                self.bar.set_postfix(step="W", rec=f"{rec.item():.4g}")
        hist["weight_step_s"] = time.perf_counter() - t0
        hist["weight_rec_loss"] = float(rec.item())

    def _act_step(self, block, layers, quantizers, q_in, fp_in, target, hist) -> None:
        cfg, spec = self.cfg, self.spec
        groups = [{"params": [q.step for q in quantizers], "lr": cfg.lr_act}]
        if spec.oso and layers:
            groups.append({"params": [p for layer in layers for p in (layer.oso_scale, layer.oso_offset)],
                           "lr": cfg.lr_oso_act})
        opt = torch.optim.Adam(groups)
        for it in range(cfg.act_iters):
            x, y = self._batch(q_in, fp_in, target)
            rec = rec_loss(self._forward(block, x), y)
            opt.zero_grad(set_to_none=True)
            rec.backward()
            opt.step()
            self.bar.update(1)
            if it % 50 == 0 or it == cfg.act_iters - 1:
                self.bar.set_postfix(step="A", rec=f"{rec.item():.4g}")
        hist["act_rec_loss"] = float(rec.item())

    @torch.no_grad()
    def block_losses(self, data: torch.Tensor) -> dict[str, float]:
        """Reconstruction loss of every block (quantized input chain vs float), on ``data``."""
        out = {}
        fp, q = data, data
        for block in self.blocks:
            t = self._run_block(block, fp, quant=False)
            qo = self._run_block(block, q, quant=True)
            out[block.name] = float(rec_loss(qo, t))
            fp, q = t, qo
        return out
