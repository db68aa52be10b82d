"""DeepSpeed's ZeRO-1/2 bf16 step without its per-step host-device syncs.

DeepSpeed 0.19's ``DeepSpeedZeroOptimizer.step`` (ZeRO-1 and -2, vltrain's default engine)
waits for the GPU twice per parameter group in every bf16 step (vltrain has two groups, with
and without weight decay): it builds the constant -1 on the host and copies it to the device
to mask a non-finite gradient norm (``mask_nan_or_inf_with_val_inplace``; a copy from pageable
host memory waits on CUDA), and it reads the norm back to ask whether it is finite before
clipping (``unscale_and_clip_grads``). The first wait covers the whole backward, so the host
can queue neither the optimizer nor the next forward while the GPU runs the backward, and
everything the host does after it leaves the GPU idle.

Both are replaced by the same arithmetic on the device: ``masked_fill_`` with a Python scalar,
and ``torch.where`` choosing infinity for a non-finite or negative norm (what DeepSpeed puts
in its place), so every step gives the same bits as DeepSpeed's own (tested with finite and
non-finite gradients). The replacement is applied only while DeepSpeed's source of both
functions is the one this was written against (its hash below): another version keeps its own
code, and the log says so.

fp32, fp16 and ``bf16.check_grad_overflow=true`` still read the norm back once per step in
``step`` itself: there DeepSpeed decides on the host whether to skip the step. ZeRO-0 and
ZeRO-3 have their own optimizers, left as they are.
"""
from __future__ import annotations

import logging
import types

import torch

from vltrain.engine.distributed import first_rank
from vltrain.upstream import source_hash

log = logging.getLogger(__name__)

# sha256 of DeepSpeed 0.19.8's source of the two functions replaced here.
KNOWN_SOURCES = {
    "mask_nan_or_inf_with_val_inplace": "9728853d4df6cd692cc5bc0aa2bfa4b54d85b0b06f30129a424cbdf93cd4ce3c",
    "unscale_and_clip_grads": "6bf2ce6f97eafcc24c08a0355e7c180992c8e86da5b7f02026eef6fbd68efa74",
}


def mask_nan_or_inf_with_val_inplace(input, device=None, val=-1.):
    """DeepSpeed's: a non-finite norm becomes -1 in place (its ``val`` is ignored there too)."""
    input.masked_fill_(~torch.isfinite(input), -1.0)


def unscale_and_clip_grads(self, grad_groups_flat, total_norm):
    """DeepSpeed's ``DeepSpeedZeroOptimizer.unscale_and_clip_grads``, the invalid-norm check on
    the device. ``self`` is the optimizer (bound per instance)."""
    if not torch.is_tensor(total_norm):
        return type(self).unscale_and_clip_grads(self, grad_groups_flat, total_norm)
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.:
        # DeepSpeed: if is_invalid_grad_norm(norm) (read back): norm = a host-built inf
        valid = torch.isfinite(total_norm) & (total_norm >= 0)
        clip_norm = torch.where(valid, total_norm, float("inf"))
        clip = ((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad
        clip = torch.clamp(clip, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in (grad if isinstance(grad, list) else [grad]):
            g.data.mul_(1. / combined_scale)


def drop_step_readbacks(optimizer) -> bool:
    """Apply the replacements to a ZeRO-1/2 ``optimizer`` (the engine's); True if applied.
    The mask is a global of DeepSpeed's ZeRO-1/2 module (imported there by name from
    ``deepspeed.runtime.utils``, which keeps the original): every ZeRO-1/2 optimizer of the
    process gets it, with the same results."""
    try:
        from deepspeed.runtime import utils as ds_utils
        from deepspeed.runtime.zero import stage_1_and_2
    except ImportError:
        return False
    if not isinstance(optimizer, stage_1_and_2.DeepSpeedZeroOptimizer):
        if type(optimizer).__name__ == "BF16_Optimizer" and first_rank():     # ZeRO-1 + bf16 + fp32 accum
            log.warning("DeepSpeed's BF16_Optimizer (ZeRO-1, bf16, data_types.grad_accum_dtype=fp32) reads the "
                        "gradient norm back in every step (a wait for the GPU) and keeps an unsharded fp32 "
                        "gradient buffer; ZeRO-2 sums gradients in fp32 without either (vltrain's default for bf16)")
        return False
    theirs = {"mask_nan_or_inf_with_val_inplace": ds_utils.mask_nan_or_inf_with_val_inplace,
              "unscale_and_clip_grads": stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads}
    changed = [name for name, fn in theirs.items() if source_hash(fn) != KNOWN_SOURCES[name]]
    if stage_1_and_2.mask_nan_or_inf_with_val_inplace not in (ds_utils.mask_nan_or_inf_with_val_inplace,
                                                               mask_nan_or_inf_with_val_inplace):
        changed.append("stage_1_and_2.mask_nan_or_inf_with_val_inplace")
    if changed:
        import deepspeed
        if first_rank():
            log.warning("DeepSpeed %s has other code in %s than vltrain's sync-free replacement was written "
                        "for: its ZeRO step keeps its own (it may wait for the GPU in every step)",
                        deepspeed.__version__, ", ".join(changed))
        return False
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = mask_nan_or_inf_with_val_inplace
    optimizer.unscale_and_clip_grads = types.MethodType(unscale_and_clip_grads, optimizer)
    return True
