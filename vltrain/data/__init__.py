"""Data: on-disk schema, StreamingDataset readers, the pretraining collator and loaders.

Submodules are imported lazily by users (``from vltrain.data.loader import build_train_loader``)
so that importing ``vltrain.data.batch`` stays cheap (no streaming import).
"""
