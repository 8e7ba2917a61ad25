"""Pallas attention kernels for the zoo. Public entry points: `attention`, `attention_reference`,
`attention_weights` (the probabilities, for inspection) and `activation_sharding` (how kernels
and activations are split inside a mesh).

`attention` validates its arguments and dispatches to the Pallas kernel of the current backend
(Triton-lowered on GPU, Mosaic on TPU), to the XLA reference, or to the GPU kernel in the Pallas
interpreter; inside a mesh the kernel runs per shard (kernels_pallas/sharding.py). See
docs/kernels.md.
"""
from kernels_pallas.api import attention, attention_weights  # noqa: F401
from kernels_pallas.reference import attention_reference  # noqa: F401
from kernels_pallas.sharding import activation_sharding  # noqa: F401

__all__ = ["attention", "attention_weights", "attention_reference", "activation_sharding"]
