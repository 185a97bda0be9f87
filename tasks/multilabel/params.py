"""params.yaml `multilabel:` — the head that learns several tags per image (one sigmoid each), on pooled features."""

from __future__ import annotations

from pydantic import Field

from tasks.sections import PooledHead


class MultilabelParams(PooledHead):
    """task: multilabel. One sigmoid per tag (binary cross-entropy), by default solved with L-BFGS with the L2
    strength chosen on the selection split; then a decision threshold per tag, chosen there too."""

    min_positives: int = Field(3, ge=1)
    """A tag with fewer positives than this on the selection split keeps the threshold 0.5 (too few to choose)."""
