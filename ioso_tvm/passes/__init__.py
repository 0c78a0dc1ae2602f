"""Relax passes of the compiler: QDQ folding (fold_qdq) and ISG group permutation planning (permute_groups)."""
