"""Tensor dtypes by name, without torch: element size and safetensors code of each dtype the checkpoints hold.

A dtype is named as torch names it (``"bfloat16"``, ``str(torch.bfloat16)`` without ``torch.``), so the
torch-free consolidation path and the torch path describe tensors alike; `torch_dtype` turns a name into the
torch object where torch is in use anyway.
"""

from __future__ import annotations

from typing import Any

# torch dtype name -> (element size in bytes, safetensors code or None when safetensors cannot store it)
DTYPES: dict[str, tuple[int, str | None]] = {
    "float64": (8, "F64"),
    "float32": (4, "F32"),
    "float16": (2, "F16"),
    "bfloat16": (2, "BF16"),
    "int64": (8, "I64"),
    "int32": (4, "I32"),
    "int16": (2, "I16"),
    "int8": (1, "I8"),
    "uint8": (1, "U8"),
    "uint16": (2, "U16"),
    "uint32": (4, "U32"),
    "uint64": (8, "U64"),
    "bool": (1, "BOOL"),
    "float8_e4m3fn": (1, "F8_E4M3"),
    "float8_e5m2": (1, "F8_E5M2"),
    "complex64": (8, "C64"),
    "complex128": (16, None),
    "float8_e4m3fnuz": (1, None),
    "float8_e5m2fnuz": (1, None),
    "float8_e8m0fnu": (1, None),
}
# Other names torch (and so torch.save pickles) use for the same dtypes.
ALIASES = {
    "double": "float64", "float": "float32", "half": "float16", "long": "int64", "int": "int32", "short": "int16",
    "cfloat": "complex64", "cdouble": "complex128",
}  # fmt: skip
SAFETENSORS_CODES: dict[str, str] = {code: name for name, (_, code) in DTYPES.items() if code is not None}


def dtype_name(dtype: Any) -> str:
    """The canonical name of a dtype given by name (aliases allowed) or as a torch dtype."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return ALIASES.get(name, name)


def itemsize(dtype: Any) -> int:
    entry = DTYPES.get(dtype_name(dtype))
    if entry is None:
        if isinstance(dtype, str):
            raise KeyError(f"unknown dtype {dtype!r}")
        return dtype.itemsize  # a torch dtype this table does not list (quantized...)
    return entry[0]


def safetensors_code(dtype: Any) -> str | None:
    """``"BF16"`` for bfloat16...; None when the dtype is unknown or safetensors cannot store it."""
    entry = DTYPES.get(dtype_name(dtype))
    return None if entry is None else entry[1]


def torch_dtype(name: str) -> Any:
    """The torch dtype of ``name`` (imports torch)."""
    import torch

    return getattr(torch, dtype_name(name))
