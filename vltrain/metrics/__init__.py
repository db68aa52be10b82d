"""Evaluation metrics: COCO caption metrics (pycocoevalcap), official VQA accuracy,
multiple-choice and grounding accuracy."""
from vltrain.metrics.accuracy import (
    box_iou,
    grounding_accuracy,
    multiple_choice_accuracy,
    paired_box_iou,
)
from vltrain.metrics.caption import (
    CAPTION_METRICS,
    CiderD,
    JavaNotFoundError,
    caption_scores,
    cider_rewards,
    evaluate_captions,
    ptb_tokenize,
    require_java,
    simple_tokenize,
    spice_status,
)
from vltrain.metrics.vqa import answer_scores, normalize_answer, vqa_accuracy, vqa_eval

__all__ = [
    "CAPTION_METRICS",
    "CiderD",
    "JavaNotFoundError",
    "answer_scores",
    "box_iou",
    "caption_scores",
    "cider_rewards",
    "evaluate_captions",
    "grounding_accuracy",
    "multiple_choice_accuracy",
    "normalize_answer",
    "paired_box_iou",
    "ptb_tokenize",
    "require_java",
    "simple_tokenize",
    "spice_status",
    "vqa_accuracy",
    "vqa_eval",
]
