"""The server's pieces without a server: the Open Inference Protocol codec, the memory budget, image size
checks and the log flood filter. Pure functions and objects, table-driven, no subprocess, no model."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from deploy.budget import Budget
from deploy.codec import (
    HEADER_LEN,
    InputSpec,
    binary_chunks,
    decode_input,
    decompress,
    deserialize_bytes,
    encode_infer_response,
    parse_infer_body,
    requested_outputs,
    serialize_bytes,
    v2_datatype,
    v2_datatype_of_ort,
)
from deploy.errors import ServeError
from deploy.images import image_pixels
from deploy.limits import FloodFilter

SPEC = InputSpec("images", 4, 5, max_batch_size=3)


def raises(status: int, *words: str):
    """Context: a ServeError with this status whose message holds every word."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(ServeError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            e = self.info.value
            assert e.status == status, (e.status, e.message)
            for w in words:
                assert w in e.message, e.message
            return handled

    return _Check()


# ----------------------------------------------------------------------------------------------- parse

def test_parse_splits_json_head_from_binary_tail():
    head = json.dumps({"inputs": []}).encode()
    req, tail = parse_infer_body(head + b"\x01\x02", str(len(head)))
    assert req == {"inputs": []} and bytes(tail) == b"\x01\x02"
    req, tail = parse_infer_body(head, None)
    assert req == {"inputs": []} and len(tail) == 0


PARSE_ERRORS = [
    (b"{not json", None, "not valid JSON"),
    (b"[]", None, "JSON object"),
    (b"null", None, "JSON object"),
    (b"\xff\xfe", None, "not valid JSON"),
    (b"", None, "not valid JSON"),
    (b'{"inputs": []}', "x", "must be an integer"),
    (b'{"inputs": []}', "999", "outside the body"),
    (b'{"inputs": []}', "-1", "outside the body"),
    (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),  # was a 500 RecursionError
    (b'{"inputs": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "nested too deeply"),
    (b'{"inputs": [], "id": 5}', None, "'id' must be a string"),
    (b'{"inputs": [], "id": [[1]]}', None, "'id' must be a string"),
]


@pytest.mark.parametrize("body, header_length, words", PARSE_ERRORS, ids=range(len(PARSE_ERRORS)))
def test_parse_errors_are_400(body, header_length, words):
    with raises(400, words):
        parse_infer_body(body, header_length)


# ----------------------------------------------------------------------------------------------- binary tail

def test_binary_chunks_cut_the_tail_by_binary_data_size():
    req = {"inputs": [{"name": "a", "parameters": {"binary_data_size": 2}}, {"name": "b", "data": [1]},
                      {"name": "c", "parameters": {"binary_data_size": 3}}]}
    chunks = binary_chunks(req, b"abcde")
    assert [None if c is None else bytes(c) for c in chunks] == [b"ab", None, b"cde"]


CHUNK_ERRORS = [
    ({}, b"", "non-empty 'inputs'"),
    ({"inputs": 5}, b"", "non-empty 'inputs'"),
    ({"inputs": [5]}, b"", "must be an object"),
    ({"inputs": [{"name": "a", "parameters": [1]}]}, b"", "'parameters' must be a JSON object"),
    ({"inputs": [{"name": "a", "parameters": {"binary_data_size": 7}}]}, b"abc", "does not fit"),
    ({"inputs": [{"name": "a", "parameters": {"binary_data_size": -1}}]}, b"", "does not fit"),
    ({"inputs": [{"name": "a", "parameters": {"binary_data_size": True}}]}, b"a", "does not fit"),
    ({"inputs": [{"name": "a", "parameters": {"binary_data_size": "2"}}]}, b"ab", "does not fit"),
    ({"inputs": [{"name": "a", "parameters": {"binary_data_size": 1}}]}, b"ab", "not claimed"),
    ({"inputs": [{"name": ["x"] * 1000, "parameters": {"binary_data_size": 9}}]}, b"", "..."),  # names cut short
]


@pytest.mark.parametrize("req, tail, words", CHUNK_ERRORS, ids=range(len(CHUNK_ERRORS)))
def test_binary_chunk_errors_are_400(req, tail, words):
    with raises(400, words) as e:
        binary_chunks(req, tail)
    assert len(e.value.message) < 300


@pytest.mark.parametrize("items", [[], [b""], [b"abc", b"", b"\x00" * 300], ["text", b"bin"]])
def test_bytes_layout_round_trips(items):
    raw = serialize_bytes(items)
    assert deserialize_bytes(raw, "x") == [i.encode() if isinstance(i, str) else i for i in items]
    assert deserialize_bytes(memoryview(raw), "x") == deserialize_bytes(raw, "x")


@pytest.mark.parametrize("raw, words", [(b"\x01\x00", "truncated"), (struct.pack("<I", 9) + b"abc", "runs past")])
def test_bytes_layout_errors_are_400(raw, words):
    with raises(400, words):
        deserialize_bytes(raw, "x")


# ----------------------------------------------------------------------------------------------- inputs

def _inp(datatype="UINT8", shape=(1, 4, 5, 3), **kw):
    return {"name": "images", "datatype": datatype, "shape": list(shape), **kw}


def test_uint8_pixels_from_json_flat_or_nested_and_from_binary():
    px = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    for data in (px.ravel().tolist(), px.tolist()):
        got = decode_input(_inp(shape=px.shape, data=data), None, SPEC)
        assert got.dtype == np.uint8 and np.array_equal(got, px)
    got = decode_input(_inp(shape=px.shape), memoryview(px.tobytes()), SPEC)
    assert np.array_equal(got, px)


def test_bytes_input_gives_the_encoded_files():
    files = [b"\x89PNG one", b"\xff\xd8 two"]
    assert decode_input(_inp("BYTES", [2]), memoryview(serialize_bytes(files)), SPEC) == files
    data = [[base64.b64encode(f).decode()] for f in files]
    assert decode_input(_inp("BYTES", [2, 1], data=data), None, SPEC) == files


INPUT_ERRORS = [
    (_inp(name="pixels"), None, "unknown input 'pixels'"),
    ({**_inp(), "name": ["images"]}, None, "unknown input"),
    ({**_inp(), "name": {"a": 1}}, None, "unknown input"),
    (_inp("FP32", data=[0.0]), None, "'FP32' is not accepted"),
    (_inp(datatype=["UINT8"]), None, "is not accepted"),
    (_inp(shape=(1, 32, 32, 3), data=[0]), None, "[N, 4, 5, 3]"),
    (_inp(shape=(0, 4, 5, 3), data=[]), None, "N >= 1"),
    (_inp(shape=(4, 4, 5, 3), data=[0]), None, "MAX_BATCH_SIZE"),
    ({**_inp(), "shape": "x"}, None, "'shape' must be a list"),
    ({**_inp(), "shape": [1, 4, 5, True]}, None, "'shape' must be a list"),
    ({**_inp(), "shape": [1.0, 4, 5, 3]}, None, "'shape' must be a list"),
    (_inp(), None, "no 'data'"),
    (_inp(data=[1, 2, 3]), None, "holds 3 values"),
    (_inp(data=[300] * 60), None, "0..255"),
    (_inp(data=[-1] * 60), None, "0..255"),
    (_inp(data=[0.5] * 60), None, "0..255"),
    (_inp(data=[True] * 60), None, "0..255"),
    (_inp(data=["a"] * 60), None, "0..255"),
    (_inp(data=[2**80] * 60), None, "0..255"),
    (_inp(data=[[1, 2], [3]]), None, "not a regular"),
    (_inp(data=json.loads("[" * 500 + "1" + "]" * 500)), None, "not a regular"),
    (_inp(data=[{"a": 1}] * 60), None, "0..255"),
    (_inp(), memoryview(b"\0" * 7), "7 bytes of binary data"),
    (_inp("BYTES", [1]), None, "no 'data' list"),
    (_inp("BYTES", [1], data=[1]), None, "must be a base64 string"),
    (_inp("BYTES", [1], data=[[["nested"]]]), None, "must be a base64 string"),
    (_inp("BYTES", [1], data=["%%% not base64"]), None, "not valid base64"),
    (_inp("BYTES", [2], data=["AA=="]), None, "1 BYTES elements"),
    (_inp("BYTES", [1, 2], data=["AA=="]), None, "[N] or [N, 1]"),
    (_inp("BYTES", [4], data=["AA=="] * 4), None, "MAX_BATCH_SIZE"),
    (_inp("BYTES", [1]), memoryview(b"\x05\0\0\0ab"), "runs past"),
]


@pytest.mark.parametrize("inp, binary, words", INPUT_ERRORS, ids=range(len(INPUT_ERRORS)))
def test_input_errors_are_400_naming_the_problem(inp, binary, words):
    with raises(400, words):
        decode_input(inp, binary, SPEC)


# ----------------------------------------------------------------------------------------------- outputs

# what detection / segmentation models will add: the codec needs no change for them
OUTPUTS = {
    "probabilities": np.array([[0.25, 0.75]], np.float32),
    "boxes": np.array([[[1, 2, 3, 4], [5, 6, 7, 8]]], np.int64),
    "labels": np.array([[3, 1]], np.int64),
    "mask": np.arange(12, dtype=np.uint8).reshape(1, 3, 4),
    "ood_score": np.array([0.5], np.float64),
    "keep": np.array([[True, False]]),
    "half": np.array([[1.5]], np.float16),
    "small": np.array([[-3]], np.int8),
    "names": np.array([["cat", "dog"]], dtype=object),
}
EXPECTED_DATATYPE = {"probabilities": "FP32", "boxes": "INT64", "labels": "INT64", "mask": "UINT8", "ood_score": "FP64",
                     "keep": "BOOL", "half": "FP16", "small": "INT8", "names": "BYTES"}


def _decode_response(body: bytes, headers: dict) -> dict[str, np.ndarray]:
    """What a V2 client does with a response (tritonclient's rules)."""
    n = int(headers.get(HEADER_LEN, len(body)))
    resp = json.loads(body[:n])
    tail, pos, out = body[n:], 0, {}
    for o in resp["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if o["datatype"] == "BYTES":
            if size is None:
                items = o["data"]
            else:
                items = [b.decode() for b in deserialize_bytes(tail[pos:pos + size], "x")]
            out[o["name"]] = np.array(items, dtype=object).reshape(o["shape"])
        else:
            dt = {v: k for k, v in __import__("deploy.codec", fromlist=["V2_DATATYPES"]).V2_DATATYPES.items()}[o["datatype"]]
            if size is None:
                out[o["name"]] = np.array(o["data"], dtype=dt).reshape(o["shape"])
            else:
                out[o["name"]] = np.frombuffer(tail[pos:pos + size], dtype=np.dtype(dt).newbyteorder("<")).reshape(o["shape"])
        pos += size or 0
        assert o["datatype"] == EXPECTED_DATATYPE[o["name"]], o
    return out


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_any_named_output_is_encoded_by_its_dtype(binary):
    req = {"id": "r1", "parameters": {"binary_data_output": binary}}
    body, headers = encode_infer_response("m", req, OUTPUTS)
    assert (HEADER_LEN in headers) == binary
    head = json.loads(body[:int(headers.get(HEADER_LEN, len(body)))])
    assert head["id"] == "r1" and head["model_name"] == "m" and head["model_version"] == "1"
    got = _decode_response(body, headers)
    assert list(got) == list(OUTPUTS)
    for name, arr in OUTPUTS.items():
        assert got[name].shape == arr.shape, name
        assert np.array_equal(got[name].astype(arr.dtype), arr), name


def test_outputs_are_chosen_and_binary_per_output():
    req = {"outputs": [{"name": "mask", "parameters": {"binary_data": True}}, {"name": "labels"}]}
    body, headers = encode_infer_response("m", req, OUTPUTS)
    got = _decode_response(body, headers)
    assert list(got) == ["mask", "labels"] and np.array_equal(got["mask"], OUTPUTS["mask"])
    assert requested_outputs(req, list(OUTPUTS)) == [("mask", True), ("labels", False)]


OUTPUT_ERRORS = [
    ({"outputs": [{"name": "nope"}]}, "unknown output 'nope'"),
    ({"outputs": [{"name": ["probabilities"]}]}, "unknown output"),  # was a 500 TypeError (unhashable)
    ({"outputs": [{"name": {"x": 1}}]}, "unknown output"),
    ({"outputs": [{"name": 3}]}, "unknown output"),
    ({"outputs": [5]}, "unknown output"),
    ({"outputs": [{}]}, "unknown output"),
    ({"outputs": {"name": "probabilities"}}, "must be a list"),
    ({"outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}, "classification"),
    ({"outputs": [{"name": "probabilities", "parameters": "x"}]}, "'parameters' must be"),
    ({"parameters": [1]}, "'parameters' must be"),
]


@pytest.mark.parametrize("req, words", OUTPUT_ERRORS, ids=range(len(OUTPUT_ERRORS)))
def test_output_request_errors_are_400(req, words):
    with raises(400, words):
        encode_infer_response("m", req, OUTPUTS)


@pytest.mark.parametrize("ort_type, v2", [("tensor(float)", "FP32"), ("tensor(double)", "FP64"), ("tensor(uint8)", "UINT8"),
                                          ("tensor(int64)", "INT64"), ("tensor(bool)", "BOOL"), ("tensor(string)", "BYTES"),
                                          ("tensor(float16)", "FP16"), ("tensor(bfloat16)", "BF16"), ("tensor(uint16)", "UINT16")])
def test_onnxruntime_types_map_to_v2_datatypes(ort_type, v2):
    assert v2_datatype_of_ort(ort_type) == v2


def test_an_output_dtype_without_a_v2_datatype_is_a_bug_not_a_client_error():
    assert v2_datatype(np.dtype("U3")) == "BYTES"
    with pytest.raises(TypeError):
        v2_datatype(np.complex64)


# ----------------------------------------------------------------------------------------------- transport

@pytest.mark.parametrize("encoding, pack", [("gzip", gzip.compress), ("deflate", zlib.compress), ("", lambda b: b),
                                            ("identity", lambda b: b)])
def test_content_encodings(encoding, pack):
    assert decompress(pack(b"hello" * 100), encoding, 1000) == b"hello" * 100


@pytest.mark.parametrize("encoding, body, status, words", [
    ("br", b"x", 415, "not supported"),
    ("gzip", b"not gzip", 400, "decompress"),
    ("gzip", gzip.compress(b"\0" * 100_000), 413, "MAX_BODY_BYTES"),  # a small bomb stays small
])
def test_content_encoding_errors(encoding, body, status, words):
    with raises(status, words):
        decompress(body, encoding, 1000)


# ----------------------------------------------------------------------------------------------- images

def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds nothing: what a decompression bomb's header looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


IMAGE_CASES = [
    (_png(30, 20), 1000, None, ""),
    (_png(40, 30), 1000, 413, "40x30 = 1200 pixels"),
    (png_header_only(5000, 5000), 40_000_000, None, ""),
    (png_header_only(60000, 60000), 40_000_000, 413, "MAX_IMAGE_PIXELS"),  # over Pillow's own bomb limit: was a 400
    (png_header_only(10000, 10000), 40_000_000, 413, "10000x10000"),  # over ours and Pillow's warning limit, under its error
    (b"", 1000, 400, "empty image"),
    (b"hello, not an image", 1000, 400, "not a recognised image format"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the server ignores it too: it checks itself
@pytest.mark.parametrize("data, max_pixels, status, words", IMAGE_CASES, ids=range(len(IMAGE_CASES)))
def test_image_size_is_checked_from_the_header(data, max_pixels, status, words):
    if status is None:
        assert image_pixels(data, max_pixels, "img") > 0
    else:
        with raises(status, words):
            image_pixels(data, max_pixels, "img")


# ----------------------------------------------------------------------------------------------- budget

def test_budget_queues_in_order_lets_one_oversized_run_alone_and_times_out_with_retry_after():
    async def scenario():
        b = Budget("test", 10, "units", "TEST_LIMIT")
        order = []

        async def user(name, n, hold):
            await b.acquire(n, timeout=5)
            order.append(("in", name, b.used))
            await asyncio.sleep(hold)
            b.release(n)

        await asyncio.gather(user("a", 6, 0.05), user("b", 6, 0.01), user("big", 25, 0.01), user("c", 4, 0.01))
        assert [o[1] for o in order] == ["a", "b", "big", "c"]  # first come, first served
        assert all(used <= 10 or name == "big" for _, name, used in order)
        assert b.used == 0 and b.peak == 25

        await b.acquire(8, timeout=1)
        with pytest.raises(ServeError) as e:
            await b.acquire(5, timeout=0.05)
        assert e.value.status == 503 and e.value.headers() == {"retry-after": "1"} and "TEST_LIMIT" in e.value.message
        assert b.waiting == 0 and b.used == 8
        waiter = asyncio.ensure_future(b.acquire(5, timeout=5))  # cancelled while waiting: leaves nothing held
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        b.release(8)
        assert b.used == 0 and b.waiting == 0

    asyncio.run(scenario())


# ----------------------------------------------------------------------------------------------- logging

def test_a_repeated_log_line_passes_once_per_interval_with_a_count():
    f = FloodFilter(interval=60)
    records = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1, f"socket.accept() out of system resource\nfd={i}", None, None)
               for i in range(1000)]
    assert sum(f.filter(r) for r in records) == 1
    other = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "something else", None, None)
    info = logging.LogRecord("asyncio", logging.INFO, __file__, 1, "socket.accept() out of system resource", None, None)
    assert f.filter(other) and f.filter(info)
    f.interval = 0  # the interval is over: the next one passes, saying how many were held back
    last = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource", None, None)
    assert f.filter(last) and "999 more like this" in last.getMessage()
