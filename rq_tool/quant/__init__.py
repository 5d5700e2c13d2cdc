"""Quantization schemes by name (registry) with exact byte accounting."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "NF4_BLOCKSIZE": ".schemes", "NF4_CODE": ".schemes", "QUANT_SCHEMES": ".schemes", "SCHEMES": ".schemes",
    "Scheme": ".schemes", "get_scheme": ".schemes", "nf4_code": ".schemes", "nf4_dequantize": ".schemes",
    "nf4_dequantize_torch": ".schemes", "scheme_for_dtype": ".schemes",
})
__all__ = [
    "NF4_BLOCKSIZE", "NF4_CODE", "QUANT_SCHEMES", "SCHEMES", "Scheme", "get_scheme", "nf4_code",
    "nf4_dequantize", "nf4_dequantize_torch", "scheme_for_dtype",
]
