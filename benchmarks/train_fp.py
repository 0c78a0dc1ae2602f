"""Train the float Fashion-MNIST models (ResNet-20, MobileNetV2-0.5) and ship their checkpoints.

Imports only numpy, torch and ioso_tvm.{models,datasets}, so it runs where TVM is absent.

    python benchmarks/train_fp.py --model resnet20 --epochs 40            # train, save, print JSON
    python benchmarks/train_fp.py --make-subsets                           # rebuild ioso_tvm/data/*.npz
    python benchmarks/train_fp.py --pack out/fmnist.npz                    # pack 60k+10k for another machine

Recipe (chosen, the usual CIFAR ResNet recipe of He et al. 2016 Sec. 4.2 with a cosine schedule
instead of step decay): SGD momentum 0.9 (Nesterov), lr 0.1 for batch 128, weight decay 5e-4
(not on BN / bias), cosine annealing to 0 per step, 1-epoch linear warm-up; augmentation
random crop 32x32 from the 4-pixel padded image + horizontal flip (p = 0.5); cross-entropy.
Final test accuracy is the last epoch's (no checkpoint selection on the test set).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ioso_tvm import datasets
from ioso_tvm.models import CHECKPOINT_DIR, build_model

CALIB_N, CALIB_SEED = 1024, 20240  # chosen: 1024 images as in the BRECQ/IOSO calibration sets
TEST_N, TEST_SEED = 2000, 20241  # chosen: 2000 images keep the test subset under 2 MB


def load_arrays(data: str | None) -> dict[str, np.ndarray]:
    """The 60k train / 10k test arrays, from a packed npz or from the Debian package."""
    if data:
        with np.load(data, allow_pickle=False) as z:
            return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    xtr, ytr = datasets.load_fashion_mnist("train")
    xte, yte = datasets.load_fashion_mnist("test")
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def make_subsets(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write the shipped class-balanced subsets; return {file: sha256}."""
    out = {}
    for kind, x, y, n, seed in (("calib", arrays["x_train"], arrays["y_train"], CALIB_N, CALIB_SEED),
                                ("test", arrays["x_test"], arrays["y_test"], TEST_N, TEST_SEED)):
        idx = datasets.balanced_selection(y, n, seed)
        path = datasets.subset_path(kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=x[idx], labels=y[idx].astype(np.uint8), indices=idx.astype(np.int32))
        out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random 32x32 crop of the ``pad``-padded batch (padding = normalised black) + random h-flip.
    x: float32 (B, 1, 32, 32) on any device."""
    b, _, h, w = x.shape
    bg = (0.0 - datasets.MEAN) / datasets.STD
    xp = F.pad(x, (pad, pad, pad, pad), value=bg)
    oh = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device="cpu").to(x.device)
    ow = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device="cpu").to(x.device)
    flip = torch.rand(b, generator=gen, device="cpu").to(x.device) < 0.5
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    cols = ow[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)
    rows = oh[:, None] + ar_h
    return xp[torch.arange(b, device=x.device)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode."""
    model.eval()
    correct = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs))
    return correct / len(x)


def train(name: str, arrays: dict[str, np.ndarray], epochs: int, seed: int, bs: int, lr: float, wd: float,
          device: str) -> tuple[nn.Module, dict]:
    """Train ``name`` from scratch; return the model and the JSON log."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xtr = torch.from_numpy(datasets.to_model_input(arrays["x_train"])).to(device)
    ytr = torch.from_numpy(arrays["y_train"].astype(np.int64)).to(device)
    xte = torch.from_numpy(datasets.to_model_input(arrays["x_test"])).to(device)
    yte = torch.from_numpy(arrays["y_test"].astype(np.int64)).to(device)
    model = build_model(name).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(xtr) // bs  # drop the last partial batch
    total, warm = epochs * steps_per_epoch, steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    log = {"model": name, "seed": seed, "epochs": epochs, "batch_size": bs, "lr": lr, "weight_decay": wd,
           "optimizer": "SGD momentum 0.9 nesterov, cosine per step, 1 epoch linear warm-up",
           "augmentation": "random crop 32 from 4-pixel padding + horizontal flip p=0.5",
           "normalisation": {"mean": datasets.MEAN, "std": datasets.STD, "pad": datasets.PAD},
           "train_images": len(xtr), "test_images": len(xte), "history": []}
    t0, step = time.time(), 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen).to(device)
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            xb, yb = augment(xtr[idx], gen), ytr[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach()
            correct += (out.argmax(1) == yb).sum()
        seen = steps_per_epoch * bs
        rec = {"epoch": epoch + 1, "loss": float(loss_sum) / steps_per_epoch, "train_acc": float(correct) / seen,
               "test_acc": evaluate(model, xte, yte), "time_s": round(time.time() - t0, 1)}
        log["history"].append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
    log["final_test_acc"] = log["history"][-1]["test_acc"]
    log["wall_time_s"] = round(time.time() - t0, 1)
    log["command"] = " ".join(["python", *sys.argv])
    log["machine"] = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                      "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
                      or platform.machine()}
    return model.cpu().eval(), log


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["resnet20", "mobilenetv2_small"])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", help="packed npz (x_train, y_train, x_test, y_test); default: the Debian package")
    ap.add_argument("--out", default=str(CHECKPOINT_DIR), help="folder for <model>.pt and <model>.json")
    ap.add_argument("--make-subsets", action="store_true", help="write ioso_tvm/data/fmnist_{calib,test}.npz")
    ap.add_argument("--pack", metavar="NPZ", help="write the 60k+10k arrays to NPZ and exit")
    args = ap.parse_args(argv)
    arrays = load_arrays(args.data)
    if args.pack:
        Path(args.pack).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.pack, **arrays)
        print(json.dumps({"packed": args.pack}))
        return
    if args.make_subsets:
        print(json.dumps({"subsets_sha256": make_subsets(arrays)}))
        return
    if not args.model:
        ap.error("--model is required to train")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    model, log = train(args.model, arrays, args.epochs, args.seed, args.batch_size, args.lr, args.wd, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, out / f"{args.model}.pt")
    (out / f"{args.model}.json").write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({"model": args.model, "epochs": args.epochs, "final_test_acc": log["final_test_acc"],
                      "wall_time_s": log["wall_time_s"], "device": log["machine"]["device"]}))


if __name__ == "__main__":
    main()
