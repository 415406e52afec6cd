"""Mixed precision for the bundles: which autocast dtype the ``amp`` keys mean on this device."""

from __future__ import annotations

import torch

__all__ = ["AMP_DTYPES", "autocast_dtype"]

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(name: str = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """The autocast dtype the bundles' ``amp_dtype`` key names.

    ``"auto"`` gives bfloat16 where the device computes it natively (CUDA compute capability 8.0 and later, and the
    CPU), float16 otherwise (older GPUs such as the V100 and T4). bfloat16 has float32's exponent range, so it needs
    no loss scaling; float16 does, and MONAI's ``SupervisedTrainer`` always scales the loss with a ``GradScaler`` when
    ``amp`` is on, which is harmless with bfloat16. Sinkhorn, k-means and the loss reductions run in float32 whatever
    this dtype is.

    Args:
        name: ``"auto"``, ``"bfloat16"`` or ``"float16"``.
        device: where training runs (default: CUDA if available, else CPU).
    """
    if name in AMP_DTYPES:
        return AMP_DTYPES[name]
    if name != "auto":
        raise ValueError(f"amp_dtype must be 'auto' or one of {tuple(AMP_DTYPES)}, got {name!r}.")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16
