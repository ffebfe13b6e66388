"""Kernels of lard_jax. Nothing outside this package knows about tiles or LSEs."""
from pallas_kernels.reference import relation_kl_reference
from pallas_kernels.relation_kl import BlockSizes, relation_kl, self_relation_kl

__all__ = ["BlockSizes", "relation_kl", "relation_kl_reference", "self_relation_kl"]
