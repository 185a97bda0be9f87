"""Dynamic micro-batching: requests queue for one worker thread, which runs the model on up to max_batch_size
images at once, waiting at most max_wait_ms for a batch to fill. The event loop never runs inference."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from deploy.errors import ServeError

log = logging.getLogger("tlcv.serve")


class _Job:
    __slots__ = ("future", "loop", "pixels")

    def __init__(self, pixels, loop, future):
        self.pixels, self.loop, self.future = pixels, loop, future


class Batcher:
    """One worker thread: gathers queued requests into batches of <= max_batch_size images, runs them.

    run(pixels) -> {output name: array with the batch on axis 0}; each request gets its own rows back.
    observe(seconds, images) is called after every run (metrics).
    """

    def __init__(self, run: Callable[[np.ndarray], dict[str, np.ndarray]], max_batch_size: int, max_wait_ms: float,
                 batching: bool, observe: Callable[[float, int], None] = lambda seconds, images: None):
        self.run, self.observe = run, observe
        self.max_batch, self.max_wait, self.batching = max_batch_size, max_wait_ms / 1000.0, batching
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self.thread.start()

    async def infer(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put(_Job(pixels, loop, fut))
        return await fut

    def close(self):
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None, bool]:
        jobs, n = [first], len(first.pixels)
        if not self.batching:
            return jobs, None, False
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, None, True
            if n + len(job.pixels) > self.max_batch:
                return jobs, job, False  # starts the next batch
            jobs.append(job)
            n += len(job.pixels)
        return jobs, None, False

    def _loop(self):
        carry: _Job | None = None
        stop = False
        while not stop:
            first = carry if carry is not None else self.queue.get()
            carry = None
            if first is None:
                break
            jobs, carry, stop = self._gather(first)
            try:
                pixels = jobs[0].pixels if len(jobs) == 1 else np.concatenate([j.pixels for j in jobs])
                t0 = time.perf_counter()
                out = self.run(pixels)
                self.observe(time.perf_counter() - t0, len(pixels))
                for name, v in out.items():
                    if len(v) != len(pixels):  # rows could not be handed back to their requests
                        raise RuntimeError(f"output {name!r} has {len(v)} rows for a batch of {len(pixels)} images")
                start = 0
                for j in jobs:
                    end = start + len(j.pixels)
                    part = {k: v[start:end] for k, v in out.items()}
                    j.loop.call_soon_threadsafe(_resolve, j.future, part, None)
                    start = end
            except Exception as e:
                log.exception("inference failed")
                for j in jobs:
                    j.loop.call_soon_threadsafe(_resolve, j.future, None, e)
        while carry is not None or not self.queue.empty():  # shutting down: fail what is left
            j = carry if carry is not None else self.queue.get_nowait()
            carry = None
            if j is not None:
                j.loop.call_soon_threadsafe(_resolve, j.future, None, ServeError(503, "server is shutting down"))


def _resolve(fut: asyncio.Future, result, error):
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
