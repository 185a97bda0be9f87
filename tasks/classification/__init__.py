"""Single-label image classification on the frozen backbone's pooled features: data, head, evaluation, export."""
