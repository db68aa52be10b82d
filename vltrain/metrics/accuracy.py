"""Multiple-choice (VCR-style) and grounding (RefCOCO+-style) accuracy.

Boxes are ``(x1, y1, x2, y2)`` in continuous coordinates (our batches normalise them to
[0, 1]), so areas are ``(x2 - x1) * (y2 - y1)`` with no "+1 pixel" term. Inputs may be
torch tensors, numpy arrays or nested lists; IoUs come back as the input's kind.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["multiple_choice_accuracy", "box_iou", "paired_box_iou", "grounding_accuracy"]


def _is_tensor(x: Any) -> bool:
    # torch is not imported here: if it was never imported, x cannot be a tensor (keeps
    # `import vltrain.metrics` light for the data tools).
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _np(x: Any) -> np.ndarray:
    if _is_tensor(x):
        import torch

        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _np_int(x: Any) -> np.ndarray:
    if _is_tensor(x):
        return x.detach().cpu().numpy().astype(np.int64)
    return np.asarray(x, dtype=np.int64)


def multiple_choice_accuracy(scores: Any, labels: Any) -> float:
    """Fraction of rows whose highest score is the labelled choice.

    ``scores``: (B, K) scores/logits per choice (ties go to the first choice);
    ``labels``: (B,) index of the right choice.
    """
    s = _np(scores)
    y = _np_int(labels).reshape(-1)
    if s.ndim != 2:
        raise ValueError(f"scores must be (B, K), got shape {s.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"{s.shape[0]} score rows but {y.shape[0]} labels")
    if s.shape[0] == 0:
        raise ValueError("multiple_choice_accuracy of an empty batch")
    if (y < 0).any() or (y >= s.shape[1]).any():
        raise ValueError(f"labels must lie in [0, {s.shape[1]})")
    return float((s.argmax(axis=1) == y).mean())


def _as_boxes(x: Any, name: str) -> np.ndarray:
    b = _np(x)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name} must be (4,) or (N, 4) boxes x1,y1,x2,y2; got shape {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"{name} contains NaN or inf")
    return b


def _area(b: np.ndarray, extra: float = 0.0) -> np.ndarray:
    return np.clip(b[:, 2] - b[:, 0] + extra, 0, None) * np.clip(b[:, 3] - b[:, 1] + extra, 0, None)


def _iou_np(a: np.ndarray, b: np.ndarray, extra: float = 0.0) -> np.ndarray:
    """(N, M) IoU; boxes with x2 < x1 or y2 < y1 have zero area; 0/0 counts as 0. ``extra=1``:
    pixel-inclusive boxes in pixels (x2 - x1 + 1 wide), VL-BERT's ``cacluate_iou``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt + extra, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = _area(a, extra)[:, None] + _area(b, extra)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _like(result: np.ndarray, *inputs: Any):
    for x in inputs:
        if _is_tensor(x):
            import torch

            dtype = x.dtype if x.is_floating_point() else torch.float32
            return torch.as_tensor(result, dtype=dtype, device=x.device)
    return result


def box_iou(a: Any, b: Any):
    """IoU of every box in ``a`` with every box in ``b``: (N, M); two single boxes give a
    Python float."""
    single = _np(a).ndim == 1 and _np(b).ndim == 1
    iou = _iou_np(_as_boxes(a, "a"), _as_boxes(b, "b"))
    if single:
        return float(iou[0, 0])
    return _like(iou, a, b)


def paired_box_iou(a: Any, b: Any, pixel_inclusive: bool = False):
    """IoU of ``a[i]`` with ``b[i]``: (N,). ``pixel_inclusive``: boxes in pixels, each side
    one pixel longer (VL-BERT's test code)."""
    pa, pb = _as_boxes(a, "a"), _as_boxes(b, "b")
    if pa.shape[0] != pb.shape[0]:
        raise ValueError(f"{pa.shape[0]} boxes vs {pb.shape[0]} boxes")
    extra = 1.0 if pixel_inclusive else 0.0
    iou = np.array([_iou_np(pa[i:i + 1], pb[i:i + 1], extra)[0, 0] for i in range(pa.shape[0])])
    return _like(iou, a, b)


def grounding_accuracy(pred_boxes: Any, gt_boxes: Any, thresh: float = 0.5, pixel_inclusive: bool = False) -> float:
    """Fraction of expressions whose predicted box has IoU >= ``thresh`` with the ground
    truth (VL-BERT's RefCOCO+ accuracy; ``pixel_inclusive`` as its code computes IoU, on
    boxes in pixels)."""
    pa, pb = _as_boxes(pred_boxes, "pred_boxes"), _as_boxes(gt_boxes, "gt_boxes")
    if pa.shape[0] != pb.shape[0]:
        raise ValueError(f"{pa.shape[0]} predicted boxes vs {pb.shape[0]} ground-truth boxes")
    if pa.shape[0] == 0:
        raise ValueError("grounding_accuracy of an empty batch")
    iou = _np(paired_box_iou(pa, pb, pixel_inclusive))
    return float((iou >= thresh).mean())
