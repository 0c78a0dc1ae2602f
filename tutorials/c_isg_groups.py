"""Tutorial (c): what the input-channel scale groups (ISG) buy, and what they cost.

The NPU's accumulator can scale the partial sum of a group of input channels by
x(1-2^-4) or x(1+2^-4) with a shift and an add. IOSO calibration learns, per conv, which
group each input channel belongs to. Here we calibrate the same ResNet-20 twice, with
IOSO, once for an NPU with a single group (``isg_group_signs=(0,)``: x1 only) and once for
the default three groups, then compare top-1 accuracy and cycles, and plot the
learned group of every input channel of one layer.

    python tutorials/c_isg_groups.py [--full] [--out tutorial_out/c]

Quick by default (minutes: 64 calibration images, 20 iterations per block, 16 test images);
``--full`` (or ``IOSO_TUTORIAL_FULL=1``) runs the published schedule (1024 images, 20000/5000
iterations per block, 256 test images; hours on a CPU).

Writes ``summary.json`` and ``groups.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import ioso_tvm  # noqa: E402
from hw_model import NPUConfig  # noqa: E402
from ioso_tvm import datasets, models  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--full", action="store_true", default=os.environ.get("IOSO_TUTORIAL_FULL") == "1",
                    help="the published schedule (hours on a CPU); default: quick (minutes)")
parser.add_argument("--wbits", type=int, default=3, help="weight bits (default 3: where groups matter most)")
parser.add_argument("--out", default="tutorial_out/c", help="output folder")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
n_calib, n_test, iters = (1024, 256, None) if args.full else (64, 16, 20)

float_model = models.load_pretrained("resnet20")
calib_images, _ = datasets.load_calib_set(n_calib)
test_images, test_labels = datasets.load_subset("test")
x_calib = torch.from_numpy(datasets.to_model_input(calib_images))
x_test, y_test = datasets.to_model_input(test_images[:n_test]), test_labels[:n_test]


def learned_groups(onnx_path: Path, config: NPUConfig) -> dict[str, np.ndarray]:
    """Group index of every input channel of each Conv/Gemm, read back from the exported ONNX:
    a ``Mul(gamma)`` in front of the layer holds each channel's group factor; without it every
    channel is in group 0, x1 (docs/onnx_format.md)."""
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    factors = list(np.asarray(config.group_factors, dtype=np.float32))
    groups = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        w_dq = producer[node.input[1]]  # DequantizeLinear of the integer weights
        channels = inits[w_dq.input[0]].shape[1]
        mul = producer.get(node.input[0])
        gamma = [inits[i] for i in (mul.input if mul is not None and mul.op_type == "Mul" else []) if i in inits]
        g = np.zeros(channels, dtype=np.int64)
        if gamma:
            g = np.array([factors.index(np.float32(v)) for v in gamma[0].reshape(-1)])
        groups[node.name] = g
    return groups


results = {}
for label, signs in (("1 group", (0,)), ("3 groups", (0, -1, 1))):
    # The group factors are part of the hardware description: calibration and compiler share
    # one NPUConfig. With a single group (x1) ISG has nothing to choose and the compiler
    # emits no group shift-add; with three, IOSO learns the group of every input channel.
    config = NPUConfig(isg_group_signs=signs)
    torch.manual_seed(0)
    calib_config = ioso_tvm.CalibConfig(seed=0, npu=config, **({"iters": iters, "act_iters": iters} if iters else {}))
    qmodel = ioso_tvm.calibrate(float_model, x_calib, method="ioso", wbits=args.wbits, abits=4, config=calib_config)
    path = out / f"resnet20_{len(signs)}g.onnx"
    ioso_tvm.export_onnx(qmodel, str(path), input_shape=(n_test, 1, 32, 32))
    compiled = ioso_tvm.compile(str(path), target="ioso_npu", input_shapes={"input": (n_test, 1, 32, 32)},
                                config=config)
    logits = np.asarray(compiled.run({"input": x_test}, mode="both"))
    layers = compiled.report().get("layers", [])
    results[label] = {"acc": float((logits.argmax(1) == y_test).mean()),
                      "cycles": sum(int(lay.get("cycles") or 0) for lay in layers),
                      "groups": {k: np.bincount(v, minlength=config.num_groups).tolist()
                                 for k, v in learned_groups(path, config).items()}}
    print(f"{label}: top-1 {100 * results[label]['acc']:.1f}% on {n_test} images, {results[label]['cycles']} cycles")

# The cost: with three groups every accumulation takes a few more cycles (journal App. A-B);
# the gain: the extra scale freedom recovers accuracy at low bit widths.
one, three = results["1 group"], results["3 groups"]
print(f"3 vs 1 group: accuracy {100 * (three['acc'] - one['acc']):+.1f} pp, "
      f"cycles {100 * (three['cycles'] / max(one['cycles'], 1) - 1):+.2f} %")

# Plot the learned group of each input channel of the layer with the most mixed groups.
config = NPUConfig()
groups = learned_groups(out / "resnet20_3g.onnx", config)
name = max(groups, key=lambda k: (np.bincount(groups[k], minlength=3) > 0).sum() * 1000 + len(groups[k]))
g = groups[name]
fig, ax = plt.subplots(figsize=(8, 2.5))
ax.scatter(np.arange(len(g)), g, c=g, cmap="viridis", s=12)
ax.set_yticks(range(config.num_groups), [f"x{f:g}" for f in config.group_factors])
ax.set_xlabel("input channel")
ax.set_title(f"learned ISG group per input channel: {name}")
fig.tight_layout()
fig.savefig(out / "groups.png")
(out / "summary.json").write_text(json.dumps({"layer_plotted": name, **results}, indent=1))
