"""Weights: checkpoint layouts and key names, loading (meta model, streamed tensors), saving, placement."""
