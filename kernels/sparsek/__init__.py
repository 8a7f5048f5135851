"""SparseK attention: a differentiable top-k of query-independent scores plus a window.

``sparsek_attention(..., impl="reference")`` is pure PyTorch and runs anywhere;
``impl="triton"`` runs the fused kernels and is imported only when called, so this
package imports without triton.
"""

from sparsek.api import sparsek_attention
from sparsek.reference import SparsekMask, sparsek_attention_reference, sparsek_mask
from sparsek.scoring import SparseKScorer

__all__ = [
    "SparseKScorer",
    "SparsekMask",
    "sparsek_attention",
    "sparsek_attention_reference",
    "sparsek_mask",
]
