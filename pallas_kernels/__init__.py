"""Kernels of lard_jax. Nothing outside this package knows about tiles or LSEs.

Public API: relation_kl, self_relation_kl, relation_kl_multi (several relations,
e.g. a layer's Q/K/V, in one launch), self_relation_kl_multi,
relation_kl_reference, BlockSizes.
Layout (docs/kernel_notes.md): relation_kl.py (contract, dispatch, custom_vjp),
one module per impl relation_kl_{gpu,mgpu,tpu,xla,reference}.py, shared
blocks.py (tile policy), _math.py (tile math), cost.py (pallas_call costs).
Note: the names relation_kl and relation_kl_reference below are the functions,
which shadow the submodules of the same name as package attributes; import the
modules with `from pallas_kernels.relation_kl_reference import ...`.
"""

from pallas_kernels.blocks import BlockSizes
from pallas_kernels.relation_kl import relation_kl, relation_kl_multi, self_relation_kl, self_relation_kl_multi
from pallas_kernels.relation_kl_reference import relation_kl_reference

__all__ = [
    "BlockSizes",
    "relation_kl",
    "relation_kl_multi",
    "relation_kl_reference",
    "self_relation_kl",
    "self_relation_kl_multi",
]
