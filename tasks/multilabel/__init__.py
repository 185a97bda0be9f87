"""Multi-label image classification (several tags per image) on the frozen backbone's pooled features."""
