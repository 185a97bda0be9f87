"""Open an onnxruntime session on CUDA when it really runs there, else CPU; say which.

No torch here: the serving image uses this module as it is. onnxruntime-gpu lists
CUDA among the *available* providers even on a machine without a GPU, and a session
asked for CUDA then falls back to CPU after logging an error; only
`session.get_providers()` tells the truth, so that is what this reports.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def open_session(model: str | Path | bytes, device: str = "auto", threads: int | None = None,
                 spinning: bool = True) -> tuple[ort.InferenceSession, str]:
    """(session, provider actually used). device: auto | cpu | cuda (cuda fails loudly if CUDA is not really used).

    spinning=False stops onnxruntime's idle threads from busy-waiting between runs (its default is to
    spin): a server wants that, since the spinning would take the cores its HTTP and decoding need.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    if device in ("auto", "cuda") and CUDA in ort.get_available_providers():
        opts.log_severity_level = 4 if device == "auto" else 2  # the fallback's library error is expected under auto
        session = ort.InferenceSession(source, opts, providers=[CUDA, CPU])
        if session.get_providers()[0] == CUDA:
            return session, CUDA
        opts.log_severity_level = 2
    if device == "cuda":
        raise RuntimeError("device=cuda but onnxruntime cannot run on CUDA here (no GPU, or CUDA/cuDNN libraries missing)")
    return ort.InferenceSession(source, opts, providers=[CPU]), CPU
