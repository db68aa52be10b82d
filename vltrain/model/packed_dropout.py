"""``model.hidden_dropout_masks=packed``: the blocks' hidden dropout from bit-packed keep masks.

Why: in the compiled blocks Inductor draws the two hidden dropouts' random numbers inside the
kernels that fuse dropout + residual + LayerNorm, one Philox call (10 rounds, ~100 integer
operations) per element, of whose four 32-bit outputs it keeps one. At micro-batch 256 that is
~0.7 G elements per step, estimated at ~4 ms of an H200's 61 ms step (BENCHMARKS.md), and the
masks it saves for the backward take a byte per element. Here one Philox call gives eight
elements a 16-bit uniform number each, the keep mask is stored one bit per element (drawn
before the fused kernel, ~88 MB per step at that size), and the fused kernels read their
element's bit. The backward reads the same bits (saved: 1/8 byte per element).

The drop probability is a multiple of 1/65536: ``round(p * 65536) / 65536`` (p = 0.1 ->
0.1000061); the kept elements are scaled by 1 / (1 - that), so the expectation is unchanged.
Bit ``i`` of byte ``j`` is element ``8 j + i`` (flattened). On CUDA with Triton, one kernel
draws the bytes (byte ``j`` from Philox counter ``j``, the seed drawn from torch's generator on
the device, so no host sync, and resuming or recomputing under activation checkpointing, which
restores torch's RNG state, redraws the same bits); elsewhere torch draws the same format
(16-bit numbers from torch's generator): the format and the arithmetic are the same, the
random streams are not.
"""
from __future__ import annotations

import torch

from vltrain.model import triton_attention

triton, tl = triton_attention.triton, triton_attention.tl

LEVELS = 1 << 16         # the draw's resolution: 16-bit uniform numbers
BYTES_PER_PROGRAM = 1024


def threshold(p: float) -> int:
    """Drop an element when its 16-bit number is below this."""
    return round(p * LEVELS)


def check_p(p: float, key: str) -> None:
    """``p`` is one the 16-bit draw can take (0, or one that rounds to 1..65535 / 65536):
    named at model build, not a division by zero (p = 1) or no dropout at all (p < 2^-17)."""
    if p and not 0 < threshold(p) < LEVELS:
        raise ValueError(f"{key}={p}: vltrain's keep bits draw the drop probability in steps of 1/{LEVELS}, "
                         f"so it must be 0 or within [{0.5 / LEVELS:.3g}, {1 - 0.5 / LEVELS:.8f})")


def drawn_p(p: float) -> float:
    """The drop probability a draw at ``p`` has: ``p`` to a multiple of 1/65536."""
    return threshold(p) / LEVELS


def scale(p: float) -> float:
    """What the kept elements are multiplied by: 1 / (1 - the drop probability actually used)."""
    return 1.0 / (1.0 - drawn_p(p))


if triton is not None:

    @triton.jit
    def _two_bits(r, cut, shift: tl.constexpr):
        """Keep bits ``shift`` (low 16 bits of ``r``) and ``shift + 1`` (high 16 bits)."""
        lo = (r & 0xFFFF).to(tl.int32)
        hi = (r >> 16).to(tl.int32)
        return ((lo >= cut).to(tl.int32) << shift) | ((hi >= cut).to(tl.int32) << (shift + 1))

    @triton.jit
    def _keep_bits_kernel(SEED, OUT, n_bytes, cut, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(tl.load(SEED), offs)
        bits = _two_bits(r0, cut, 0) | _two_bits(r1, cut, 2) | _two_bits(r2, cut, 4) | _two_bits(r3, cut, 6)
        tl.store(OUT + offs, bits.to(tl.uint8), mask=offs < n_bytes)


def _draw_triton(n_bytes: int, p: float, device: torch.device) -> torch.Tensor:
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)
    out = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    with triton_attention.on_device(device):
        _keep_bits_kernel[(triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)](seed, out, n_bytes, threshold(p),
                                                                       BLOCK=BYTES_PER_PROGRAM)
    return out


def pack(keep: torch.Tensor) -> torch.Tensor:
    """Bool (..., 8 k) -> uint8 (..., k): bit ``i`` of byte ``j`` is element ``8 j + i`` of the last dim."""
    k = keep.reshape(*keep.shape[:-1], -1, 8).to(torch.int32)
    return (k << torch.arange(8, dtype=torch.int32, device=keep.device)).sum(-1).to(torch.uint8)


def _draw_torch(n_bytes: int, p: float, device: torch.device) -> torch.Tensor:
    return pack(torch.randint(0, LEVELS, (n_bytes * 8,), dtype=torch.int32, device=device) >= threshold(p))


# Opaque to torch.compile: one node in the compiled blocks. Tagged random, else the compiler
# takes it for a pure function: it merged a block's two identical calls (same count, p and
# device) into one draw, one mask for both dropouts (caught by the compiled = eager test).
# The elements' count and device are arguments, not a tensor, so that no activation must
# exist in memory before the draw (Inductor would otherwise write the fused input out for it).
@torch.library.custom_op("vltrain::keep_bits", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def keep_bits(n: int, p: float, device: torch.device) -> torch.Tensor:
    """(ceil(n / 8),) uint8: the keep mask of ``n`` elements at drop probability ``p``."""
    n_bytes = (n + 7) // 8
    if triton_attention.runs_on(device.type):
        return _draw_triton(n_bytes, p, device)
    return _draw_torch(n_bytes, p, device)


@keep_bits.register_fake
def _(n, p, device):
    return torch.empty((n + 7) // 8, dtype=torch.uint8, device=device)


def _bit_columns(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the bytes as an (N, 1) int32 column, the bit positions 0..7 as a row)."""
    return bits.to(torch.int32)[:, None], torch.arange(8, dtype=torch.int32, device=bits.device)


def _shaped(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1)[:like.numel()].view(like.shape)


def unpack(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 0/1 keep mask of ``like``'s shape, in ``like``'s dtype (elementwise: fused by Inductor)."""
    b, i = _bit_columns(bits)
    return _shaped((b >> i) & 1, like).to(like.dtype)


def _unpack_bool(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The same mask as ``unpack``, as bools, by other operations: the backward's. Were they the
    same operations, the compiler would merge the backward's unpacking with the forward's
    (common subexpressions) and then save the forward's unpacked mask (4 bytes per element)
    for the backward instead of the bits."""
    b, i = _bit_columns(bits)
    return _shaped((b & (1 << i)) != 0, like)


class _Dropout(torch.autograd.Function):
    """y * keep * scale, saving only the bits (an eager ``y * keep`` would save the unpacked mask)."""

    @staticmethod
    def forward(ctx, y, bits, factor):
        ctx.save_for_backward(bits)
        ctx.factor = factor
        return y * unpack(bits, y) * factor

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        return torch.where(_unpack_bool(bits, grad), grad * ctx.factor, 0.0), None, None


def apply_bits(y: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout of ``y`` with the keep mask ``bits`` (from ``keep_bits(y.numel(), p, ...)``)."""
    return _Dropout.apply(y, bits, scale(p))


def packed_dropout(y: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(y, p)`` in training, drawn as the module docstring says."""
    if p <= 0:
        return y
    return apply_bits(y, keep_bits(y.numel(), p, y.device), p)
