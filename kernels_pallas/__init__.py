"""Pallas attention kernels for the zoo. Public entry points: `attention`, `attention_reference`."""
from kernels_pallas.reference import attention_reference  # noqa: F401
