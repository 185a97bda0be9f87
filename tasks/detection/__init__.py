"""Object detection on the frozen backbone: data, head, training, evaluation and export (not stages)."""
