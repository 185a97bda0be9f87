"""The Open Inference Protocol (KServe V2, as Triton speaks it) on the wire: pure functions, no I/O, no model.

    parse_infer_body    body bytes (+ Inference-Header-Content-Length) -> (JSON request, binary tail)
    binary_chunks       the tail cut into each input's binary_data_size
    decode_input        one input -> uint8 pixels [N, H, W, 3], or the encoded images of a BYTES input
    encode_infer_response  any named numpy outputs -> JSON or JSON + binary tail (the datatype follows the dtype)
    deserialize_bytes / serialize_bytes  Triton's BYTES layout (4-byte little-endian length, then the bytes)
    decompress          Content-Encoding gzip / deflate, bounded

Every malformed input is a ServeError (400, 413 or 415) whose message names the problem; nothing
here raises anything else on client data.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from deploy.errors import ServeError, bad

HEADER_LEN = "inference-header-content-length"

# numpy dtype name -> V2 datatype. Object / str / bytes arrays are BYTES.
V2_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
# onnxruntime's element type names that are not numpy's
_ORT_NAMES = {"float": "float32", "double": "float64"}


def v2_datatype(dtype: np.dtype | str) -> str:
    """The V2 datatype of a numpy dtype (BYTES for strings/objects); a model output of any other dtype is a bug."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return V2_DATATYPES[dtype.name]
    except KeyError:
        raise TypeError(f"no Open Inference Protocol datatype for numpy dtype {dtype.name}") from None


def v2_datatype_of_ort(ort_type: str) -> str:
    """'tensor(float)' -> 'FP32', 'tensor(string)' -> 'BYTES', 'tensor(bfloat16)' -> 'BF16'."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    if name == "string":
        return "BYTES"
    if name == "bfloat16":
        return "BF16"
    try:
        return v2_datatype(_ORT_NAMES.get(name, name))
    except TypeError:
        return name.upper()


# ----------------------------------------------------------------------------------------------- request

def parse_infer_body(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(JSON request, binary tail) of a V2 infer body; header_length is Inference-Header-Content-Length, if sent."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise bad(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if n < 0 or n > len(body):
            raise bad(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
    else:
        n = len(body)
    view = memoryview(body)
    try:
        req = json.loads(view[:n].tobytes() if n != len(body) else body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad("request JSON is nested too deeply") from None
    if not isinstance(req, dict):
        raise bad("request body must be a JSON object with an 'inputs' list")
    if "id" in req and not isinstance(req["id"], str):
        raise bad(f"'id' must be a string, got {type(req['id']).__name__}")
    return req, view[n:]


def params(obj: dict, what: str) -> dict:
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise bad(f"{what}: 'parameters' must be a JSON object, got {type(p).__name__}")
    return p


def shape_of(inp: dict, what: str) -> list[int]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"{what}: 'shape' must be a list of non-negative integers, got {_short(shape)}")
    return shape


def binary_chunks(req: dict, tail: memoryview | bytes) -> list[memoryview | None]:
    """Each input's slice of the binary tail (None for inputs sent as JSON data); every byte must be claimed."""
    tail = memoryview(tail)
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad("request needs a non-empty 'inputs' list")
    chunks: list[memoryview | None] = []
    pos = 0
    for inp in inputs:
        if not isinstance(inp, dict):
            raise bad("each entry of 'inputs' must be an object with name, datatype, shape and data")
        name = _short(inp.get("name"))
        size = params(inp, f"input {name}").get("binary_data_size")
        if size is None:
            chunks.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or pos + size > len(tail):
            raise bad(f"input {name}: binary_data_size {_short(size)} does not fit the {len(tail) - pos} binary bytes left")
        chunks.append(tail[pos:pos + size])
        pos += size
    if pos != len(tail):
        raise bad(f"{len(tail) - pos} bytes of binary data are not claimed by any input's binary_data_size")
    return chunks


def deserialize_bytes(raw: memoryview | bytes, what: str) -> list[bytes]:
    """Triton's BYTES binary layout: each element is a 4-byte little-endian length, then the bytes."""
    raw = memoryview(raw)
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise bad(f"{what}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise bad(f"{what}: BYTES element of {n} bytes runs past the end of the data")
        out.append(raw[i:i + n].tobytes())
        i += n
    return out


def serialize_bytes(items) -> bytes:
    parts = []
    for x in items:
        b = x.encode() if isinstance(x, str) else bytes(x)
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: one uint8 [N, H, W, 3] input; BYTES [N] of encoded images stands in for it."""

    name: str
    height: int
    width: int
    max_batch_size: int

    def describe(self) -> str:
        return f"UINT8 [-1, {self.height}, {self.width}, 3] pixels or BYTES [-1] encoded images"


def decode_input(inp: dict, binary: memoryview | None, spec: InputSpec) -> np.ndarray | list[bytes]:
    """One V2 input -> uint8 pixels [N, H, W, 3], or (BYTES) the list of encoded image files, still to be decoded."""
    name = inp.get("name")
    if not isinstance(name, str) or name != spec.name:
        raise bad(f"unknown input {_short(name)}: the model takes one input named '{spec.name}' ({spec.describe()})")
    what = f"input '{name}'"
    dt = inp.get("datatype")
    shape = shape_of(inp, what)
    h, w = spec.height, spec.width
    if dt == "UINT8":
        if len(shape) != 4 or shape[1:] != [h, w, 3] or shape[0] < 1:
            raise bad(f"{what}: shape {shape} does not match the expected [N, {h}, {w}, 3] (N >= 1) for UINT8 pixels")
        _check_batch(shape[0], spec, what)
        count = int(np.prod(shape))
        if binary is not None:
            if len(binary) != count:
                raise bad(f"{what}: {len(binary)} bytes of binary data for shape {shape} (expected {count})")
            return np.frombuffer(binary, np.uint8).reshape(shape)
        data = inp.get("data")
        if data is None:
            raise bad(f"{what}: no 'data' and no binary_data_size")
        try:
            arr = np.asarray(data)
        except (ValueError, TypeError, RecursionError) as e:
            raise bad(f"{what}: 'data' is not a regular (flat or nested) list of numbers: {_short(str(e))}") from None
        if arr.size != count:
            raise bad(f"{what}: 'data' holds {arr.size} values, shape {shape} needs {count}")
        if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise bad(f"{what}: UINT8 'data' must be integers 0..255")
        return arr.astype(np.uint8).reshape(shape)
    if dt == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
            raise bad(f"{what}: shape {shape} does not match the expected [N] or [N, 1] (N >= 1) for BYTES images")
        _check_batch(shape[0], spec, what)
        if binary is not None:
            items = deserialize_bytes(binary, what)
        else:
            data = inp.get("data")
            if not isinstance(data, list):
                raise bad(f"{what}: no 'data' list and no binary_data_size")
            flat = [x for row in data for x in (row if isinstance(row, list) else [row])]
            items = []
            for i, x in enumerate(flat):
                if not isinstance(x, str):
                    raise bad(f"{what}: BYTES element {i} must be a base64 string in JSON")
                try:
                    items.append(base64.b64decode(x, validate=True))
                except (binascii.Error, ValueError):
                    raise bad(f"{what}: BYTES element {i} is not valid base64 (JSON carries encoded images as base64)") from None
        if len(items) != shape[0]:
            raise bad(f"{what}: {len(items)} BYTES elements for shape {shape}")
        return items
    raise bad(f"{what}: datatype {_short(dt)} is not accepted: expected UINT8 (pixels [N, {h}, {w}, 3]) "
              "or BYTES (encoded images)")


def _check_batch(n: int, spec: InputSpec, what: str):
    if n > spec.max_batch_size:
        raise bad(f"{what}: {n} images in one request, over the limit of {spec.max_batch_size} (MAX_BATCH_SIZE)")


def _short(x: Any, limit: int = 80) -> str:
    """repr of a client-sent value, cut short: error messages never echo a megabyte back."""
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + "..."


# ----------------------------------------------------------------------------------------------- response

def requested_outputs(req: dict, available: list[str]) -> list[tuple[str, bool]]:
    """[(output name, as binary)] the request asks for (all outputs when it names none), validated."""
    all_binary = bool(params(req, "request").get("binary_data_output", False))
    wanted = req.get("outputs")
    if wanted is None:
        return [(n, all_binary) for n in available]
    if not isinstance(wanted, list):
        raise bad("'outputs' must be a list of {name, parameters}")
    out = []
    for o in wanted:
        name = o.get("name") if isinstance(o, dict) else None
        if not isinstance(name, str) or name not in available:
            raise bad(f"unknown output {_short(name)}: the model's outputs are {available}")
        op = params(o, f"output '{name}'")
        if "classification" in op:
            raise bad("the classification extension is not supported: ask for 'probabilities' and use the labels "
                      "in the model metadata")
        out.append((name, bool(op.get("binary_data", all_binary))))
    return out


def encode_infer_response(model_name: str, req: dict, out: dict[str, np.ndarray],
                          model_version: str = "1") -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a V2 infer response carrying the requested outputs, whatever their dtype and shape."""
    outputs, blobs = [], []
    for name, binary in requested_outputs(req, list(out)):
        arr = np.asarray(out[name])
        dt = v2_datatype(arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if binary:
            raw = serialize_bytes(arr.ravel()) if dt == "BYTES" else np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif dt == "BYTES":
            entry["data"] = [x if isinstance(x, str) else base64.b64encode(bytes(x)).decode() for x in arr.ravel()]
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    resp: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if "id" in req:
        resp["id"] = req["id"]
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LEN: str(len(head))}


# ----------------------------------------------------------------------------------------------- transport

def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding gzip/deflate; more than `limit` bytes out is a 413 (no decompression bombs)."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "deflate"):
        raise ServeError(415, f"Content-Encoding {_short(encoding)} is not supported (gzip, deflate or none)")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise bad(f"cannot {enc}-decompress the body: {e}") from None
    if len(out) > limit:
        raise ServeError(413, f"decompressed body is over the limit of {limit} bytes (MAX_BODY_BYTES)")
    return out
