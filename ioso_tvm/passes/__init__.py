"""The NPU pass pipeline, for users of the library: the passes live in ``target_npu.transform``
(``fold_qdq``, ``permute_groups``, ``pipeline``); import them from there in new code."""
from target_npu.transform.pipeline import (
    FoldQDQ,
    NPUCompileState,
    PartitionForNPU,
    PlanGroupPermutation,
    npu_pipeline,
    pass_names,
)

__all__ = ["NPUCompileState", "FoldQDQ", "PlanGroupPermutation", "PartitionForNPU", "npu_pipeline", "pass_names"]
