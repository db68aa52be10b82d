"""Checkpoint tools (``vltrain-ckpt`` / ``python -m vltrain.ckpt``): inspect, reshard N -> M ranks
(DeepSpeed universal checkpoints), consolidate to one safetensors file, export to a Hugging
Face-style folder. See ``vltrain/ckpt/__main__.py`` for the commands."""
