"""Block-wise Hadamard rotation along the last dimension (the reduction dimension of a Linear).

H_b is the Sylvester Hadamard matrix of size b scaled by 1/sqrt(b): orthogonal and symmetric, so it is its
own inverse. A Linear computes x W^T = (x H)(W H)^T for any such H; quantizing W H (and x H) instead of W
(and x) spreads an outlier over its block, which is what MR-GPTQ / QuaRot-style rotations exploit.

The transform is computed with butterflies (additions and subtractions, then one multiplication per
element), never a matmul, so it is the same float32 values on every device and for every kernel backend:
the backends quantize the same rotated tensor and stay bit-exact to each other.
"""

from __future__ import annotations

import math

import torch

BLOCK_SIZES = (16, 32, 64, 128, 256)


def hadamard_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., n) -> x with every block of `block` consecutive values along the last dimension multiplied by
    H_block; float32 arithmetic, same shape and dtype. n must be a multiple of `block` (a power of two)."""
    n = x.shape[-1]
    if block not in BLOCK_SIZES or n % block:
        raise ValueError(f"rotation block {block} must be one of {BLOCK_SIZES} and divide the last dimension {n}")
    dtype = x.dtype
    y = x.to(torch.float32).reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = torch.stack((a + b, a - b), dim=3).reshape(y.shape[0], y.shape[1], block)
        h *= 2
    y = y * (1.0 / math.sqrt(block))
    return y.reshape(x.shape).to(dtype)


def unrotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """The inverse rotation (H is symmetric and orthogonal: its own inverse)."""
    return hadamard_blocks(x, block)
