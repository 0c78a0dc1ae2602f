"""The TVM side of the NPU: patterns, tensor intrinsics, schedules, codegen, runtime, tvmc, tuner."""
