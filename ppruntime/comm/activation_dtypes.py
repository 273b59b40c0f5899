"""Wire codes of activation dtypes (in the microbatch header; 0 = no activations).

numpy has no bfloat16: its activations travel as uint16 (the same bytes)."""

from __future__ import annotations

import numpy as np
import torch

DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float16): 2, np.dtype(np.uint16): 3}
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}

_NUMPY_STANDINS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def dtype_code_of(dtype: torch.dtype) -> int:
    return DTYPE_CODES[np.dtype(_NUMPY_STANDINS[dtype])]
