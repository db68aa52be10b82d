"""The unified vision-language model: pure torch (no DeepSpeed, no distributed calls, no I/O
beyond ``from_pretrained``)."""
from vltrain.model.vl_model import VLModel, VLModelOutput

__all__ = ["VLModel", "VLModelOutput"]
