"""Semantic segmentation on the frozen backbone: data, decoder, training, metrics, evaluation and export (not stages)."""
