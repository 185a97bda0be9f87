"""The server's settings: one dataclass; every field is a flag and an environment variable (flags win)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from typing import Any

MIB = 1024 * 1024


@dataclass
class Settings:
    model_path: str = "export/model.onnx"
    model_name: str = "classifier"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    threads: int = 0  # onnxruntime intra-op threads; 0 = all cores
    ort_spinning: bool = False  # let onnxruntime's idle threads spin (lower latency alone, less CPU for the rest)
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    batching: bool = True
    max_body_bytes: int = 32 * MIB  # one request body (after Content-Encoding too)
    max_image_pixels: int = 40_000_000  # one image, width x height as declared
    # -- what keeps a replica inside its memory and file limits whatever clients send
    max_buffered_bytes: int = 64 * MIB  # request bodies held at once, all requests together
    max_decode_pixels: int = 80_000_000  # image pixels being decoded at once, all requests together
    queue_timeout_s: float = 30.0  # longest wait for either budget; then 503 + Retry-After
    read_timeout_s: float = 30.0  # a request's head, and then its body, must each arrive within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1000  # open connections (lowered to fit the open-file limit); idle ones make room
    log_level: str = "info"
    startup_delay_s: float = 0.0  # wait before loading the model (to exercise readiness; 0 in production)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        p = argparse.ArgumentParser(prog="python -m deploy.server",
                                    description="Serve an exported model over the Open Inference Protocol and /v1/predict.")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type == "bool":
                p.add_argument(flag, type=parse_bool, default=None, metavar="1|0", help=f"env {f.name.upper()}")
            else:
                p.add_argument(flag, type=_TYPES[f.type], default=None, help=f"env {f.name.upper()} (default {f.default})")
        p.add_argument("--model", dest="model_path_alias", metavar="PATH", default=None, help="same as --model-path")
        a = p.parse_args(argv)
        values: dict[str, Any] = {}
        for f in fields(cls):
            v = getattr(a, f.name)
            if v is None and f.name.upper() in env:
                try:
                    v = (parse_bool if f.type == "bool" else _TYPES[f.type])(env[f.name.upper()])
                except (ValueError, argparse.ArgumentTypeError) as e:
                    p.error(f"environment {f.name.upper()}={env[f.name.upper()]!r}: {e}")
            if v is not None:
                values[f.name] = v
        if a.model_path_alias:
            values["model_path"] = a.model_path_alias
        s = cls(**values)
        positive = ("max_batch_size", "max_body_bytes", "max_image_pixels", "max_buffered_bytes", "max_decode_pixels",
                    "queue_timeout_s", "read_timeout_s", "keep_alive_s", "max_connections")
        low = [f"{n.upper()}={getattr(s, n)}" for n in positive if getattr(s, n) <= 0]
        if low or s.max_wait_ms < 0:
            p.error(f"must be > 0: {', '.join(low) or '-'}; MAX_WAIT_MS must be >= 0")
        if s.device not in ("auto", "cpu", "cuda"):
            p.error("device must be auto, cpu or cuda")
        return s


def parse_bool(v: str) -> bool:
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v!r}")


_TYPES = {"str": str, "int": int, "float": float}
