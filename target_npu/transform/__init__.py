"""The NPU's Relax passes: QDQ folding (``fold_qdq``), ISG group permutation planning (``permute_groups``)
and the ``ioso_npu.pipeline`` that chains them with the partition (``pipeline``)."""
