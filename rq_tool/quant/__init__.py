"""Quantization schemes by name (registry) with exact byte accounting."""

from .schemes import (
    NF4_BLOCKSIZE,
    QUANT_SCHEMES,
    SCHEMES,
    Scheme,
    dtype_for_scheme,
    get_scheme,
    nf4_code,
    nf4_dequantize_torch,
    scheme_for_dtype,
)

__all__ = [
    "NF4_BLOCKSIZE",
    "QUANT_SCHEMES",
    "SCHEMES",
    "Scheme",
    "dtype_for_scheme",
    "get_scheme",
    "nf4_code",
    "nf4_dequantize_torch",
    "scheme_for_dtype",
]
