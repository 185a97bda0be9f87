"""The server holds its limits: slow or half-sent requests are closed within READ_TIMEOUT_S, a flood of
connections under a low open-file limit neither starves health checks nor floods the log, and request
bodies and image decoding stay inside their memory budgets. A real server process on 127.0.0.1 each time.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve import MODEL_NAME, ServerProcess, encode, metric_samples, model  # noqa: F401 - model is a fixture

httpx = pytest.importorskip("httpx")

INFER = f"/v2/models/{MODEL_NAME}/infer"


def half_request(port: int, kind: str) -> socket.socket:
    """A connection that sends part of a request and then waits."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if kind == "head":  # request line and part of the headers
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Le".encode())
    elif kind == "body":  # whole head, 10 of the 1000 bytes its Content-Length promises
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                  '{"inputs":'.encode())
    return s  # kind "silent": connected, nothing sent


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """(everything the server sent, seconds until it closed the connection)."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        return data + b"<still open>", time.monotonic() - t0
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def health_ok(url: str) -> float:
    """Seconds /v2/health/ready took to answer 200 (fails otherwise)."""
    t0 = time.monotonic()
    r = httpx.get(url + "/v2/health/ready", timeout=5)
    assert r.status_code == 200, (r.status_code, r.text)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def quick_timeouts(model, tmp_path_factory):
    s = ServerProcess(model[0], tmp_path_factory.mktemp("log") / "server.log", "--read-timeout-s", "2").wait_ready()
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.mark.parametrize("kind, answer", [("head", b"408"), ("body", b"408"), ("silent", b"")])
def test_half_sent_requests_are_answered_and_closed_within_the_read_timeout(quick_timeouts, kind, answer):
    s = quick_timeouts
    socks = [half_request(s.port, kind) for _ in range(10)]
    t0 = time.monotonic()
    assert health_ok(s.url) < 1  # they wait; health does not
    for sock in socks:
        data, _ = read_until_closed(sock, timeout=10)
        took = time.monotonic() - t0
        assert 1.5 < took < 6, (kind, took, data)  # READ_TIMEOUT_S is 2
        if answer:
            assert data.startswith(b"HTTP/1.1 " + answer), data
            assert b"READ_TIMEOUT_S" in data and b"connection: close" in data.lower(), data
        else:
            assert data == b"", data
        sock.close()
    assert health_ok(s.url) < 1


def test_a_body_shorter_than_its_content_length_is_a_408_not_a_hang(quick_timeouts):
    s = quick_timeouts
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode() + b'{"inputs": []}')
    data, took = read_until_closed(sock, timeout=10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 408") and b"14 bytes arrived" in data and b"Content-Length" in data, data
    assert 1.5 < took < 6


def test_bodies_wait_for_the_body_budget_then_503_with_retry_after(model, tmp_path):
    # MAX_BUFFERED_BYTES 3000: a request declaring 2500 bytes and not sending them holds most of it
    s = ServerProcess(model[0], tmp_path / "budget.log", "--read-timeout-s", "3", "--max-buffered-bytes", "3000",
                      "--queue-timeout-s", "1").wait_ready()
    try:
        holder = half_request(s.port, "head")
        holder.sendall(b"ngth: 2500\r\nContent-Type: application/json\r\n\r\n")
        time.sleep(0.3)
        t0 = time.monotonic()
        r = httpx.post(s.url + INFER, content=b"x" * 1000, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "MAX_BUFFERED_BYTES" in r.json()["error"], r.text
        assert 0.8 < time.monotonic() - t0 < 2.5  # QUEUE_TIMEOUT_S is 1
        assert health_ok(s.url) < 1  # no body: never waits
        data, _ = read_until_closed(holder, timeout=10)  # the holder gets its 408 in time, and the budget comes back
        assert data.startswith(b"HTTP/1.1 408"), data
        r = httpx.post(s.url + INFER, content=b"x" * 1000, timeout=30)
        assert r.status_code == 400 and "not valid JSON" in r.text, r.text
    finally:
        assert s.stop() == 0, s.log.read_text()[-3000:]


def test_a_connection_flood_under_a_low_file_limit_keeps_health_answering_and_the_log_short(model, tmp_path):
    # The reported failure: 300 half-sent requests and a low `ulimit -n`: health checks timed out and the log grew
    # by ~96 MB in 35 s of EMFILE tracebacks. Here: 300 of them against 160 open files (MAX_CONNECTIONS is lowered
    # to fit), health checked all along from another thread.
    # The client opens them at ~18/s however fast the machine is: the listen backlog (16 at this limit) fills within
    # one server loop turn and the next SYN waits out the kernel's 1 s retry. READ_TIMEOUT_S must therefore outlast
    # the ~4.5 s it takes to open MAX_CONNECTIONS (80) of them: at 4 s the cap was reached by a few connections
    # only (make_room closed 36 here, 0 on a CI run); at 10 s ~180 are open when the first time out.
    s = ServerProcess(model[0], tmp_path / "flood.log", "--read-timeout-s", "10", nofile=160).wait_ready()
    socks, health, stop = [], [], threading.Event()

    def check_health():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                code = httpx.get(s.url + "/v2/health/ready", timeout=3).status_code
            except httpx.TransportError as e:
                code = type(e).__name__
            health.append((code, time.monotonic() - t0))
            time.sleep(0.2)

    checker = threading.Thread(target=check_health)
    checker.start()
    try:
        for i in range(300):
            socks.append(half_request(s.port, ("head", "body", "silent")[i % 3]))
        deadline = time.monotonic() + 15  # READ_TIMEOUT_S 10: all of them closed soon after
        for sock in socks:
            data, _ = read_until_closed(sock, timeout=max(0.1, deadline - time.monotonic()))
            assert not data.endswith(b"<still open>"), data
        samples = metric_samples(httpx.get(s.url + "/metrics").text)
        assert httpx.get(f"{s.url}/v2/models/{MODEL_NAME}", timeout=5).status_code == 200  # still serving
    finally:
        stop.set()
        checker.join()
        for sock in socks:
            sock.close()
        code = s.stop()
    log = s.log.read_text()
    assert code == 0, log[-3000:]
    assert len(health) > 20 and all(c == 200 for c, _ in health), health
    assert sorted(t for _, t in health)[len(health) // 2] < 0.5, health  # (a full listen queue costs a SYN retry: 1 s)
    closed = {dict(k[1])["reason"]: v for k, v in samples.items() if k[0] == "tlcv_connections_closed_total"}
    closed["408 on a body"] = sum(v for k, v in samples.items() if k[0] == "tlcv_request_errors_total" and ("code", "408") in k[1])
    # each of the 300 closed by the server; the cap made room for most (205 of 300 here, 2026-12-07)
    assert closed.get("make_room", 0) >= 50 and sum(closed.values()) >= 295, closed
    assert len(log) < 20_000 and "Too many open files" not in log, f"{len(log)} bytes of log:\n{log[:3000]}"
    assert "lowered to" in log


def _png(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    px = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((size, size), rng.integers(256))), -1)
    return encode(Image.fromarray(px.astype(np.uint8)), "PNG")


def proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_decoding_stays_inside_the_pixel_budget_and_memory_with_it(model, tmp_path):
    # 6 requests of 4 images of 9 M pixels at once; MAX_DECODE_PIXELS lets one image decode at a time. Measured
    # here (2026-12-05, 3 runs each): within the budget the server grows by 115-119 MiB; with the budget lifted
    # (6 at once) by 346-392 MiB. (With 2 at a time it grew by 150-232 MiB, too close to a bound to hold.)
    side, per_image = 3000, 3000 * 3000
    s = ServerProcess(model[0], tmp_path / "decode.log", "--max-image-pixels", str(per_image),
                      "--max-decode-pixels", str(per_image)).wait_ready()
    try:
        pngs = [_png(side, i) for i in range(4)]
        rss0 = proc_status_kib(s.proc.pid, "VmRSS")
        codes, barrier = [], threading.Barrier(6)

        def client():
            barrier.wait()
            r = httpx.post(s.url + "/v1/predict", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)],
                           timeout=120)
            codes.append(r.status_code)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        hwm = proc_status_kib(s.proc.pid, "VmHWM")
        samples = metric_samples(httpx.get(s.url + "/metrics").text)
    finally:
        assert s.stop() == 0, s.log.read_text()[-3000:]
    assert codes == [200] * 6
    peak = samples[("tlcv_budget_peak", (("budget", "decode_pixels"),))]
    assert peak == per_image  # it ran one at a time, never more
    grew_mib = (hwm - rss0) / 1024
    assert grew_mib < 220, f"server grew by {grew_mib:.0f} MiB while decoding"
