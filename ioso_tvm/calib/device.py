"""Where calibration runs: ``CalibConfig.device`` / ``QFTConfig.device`` / ``ioso-calibrate --device``.

``resolve_device(None)`` is CUDA when torch sees a GPU, else the CPU; ``"cpu"``, ``"cuda"``,
``"cuda:N"`` (and ``"mps"`` on Apple silicon) are accepted when present. Every refusal is one
line that says what to use instead. The calibrated model is handed back on the CPU, so export,
deploy mode and the compiler see the same tensors whatever device calibrated.
"""
from __future__ import annotations

import torch

ACCEPTED = "'cpu', 'cuda', 'cuda:N' (N a GPU index) or None (cuda when available, else cpu)"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device that calibration runs on; raises ValueError (one line) if it is unknown or absent."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be {ACCEPTED}; got a {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device; use {ACCEPTED}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available (this torch "
                             f"{torch.__version__} sees no GPU); use device 'cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r} requested but torch sees {count} GPU(s) "
                             f"(cuda:0..cuda:{count - 1})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r} requested but MPS is not available; use device 'cpu'")
        return dev
    raise ValueError(f"device {str(device)!r} is not supported for calibration; use {ACCEPTED}")


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of the first parameter or buffer of ``module`` (the CPU if it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
