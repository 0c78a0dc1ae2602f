"""The NPU itself, in numpy: config, numeric contract, ISA, functional simulator, cycle model.

Imports neither torch nor tvm.
"""
from hw_model.config import DEFAULT_CONFIG, NPUConfig

__all__ = ["NPUConfig", "DEFAULT_CONFIG"]
