"""Prometheus metrics of the server, in their own registry, and the endpoint label of a request path."""

from __future__ import annotations


class Metrics:
    def __init__(self):
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        prometheus_client.disable_created_metrics()  # no *_created series: less noise per scrape

        self.registry = r = CollectorRegistry()
        self.requests = Counter("tlcv_requests", "HTTP requests", ["endpoint"], registry=r)
        self.errors = Counter("tlcv_request_errors", "HTTP responses with status >= 400", ["endpoint", "code"], registry=r)
        self.latency = Histogram("tlcv_request_duration_seconds", "HTTP request latency", ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("tlcv_batch_size", "Images per onnxruntime run", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.inference = Histogram("tlcv_inference_duration_seconds", "onnxruntime run time per batch", registry=r,
                                   buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.images = Counter("tlcv_images", "Images classified", registry=r)
        self.ready = Gauge("tlcv_model_ready", "1 when the model is loaded and warmed up", registry=r)
        self.connections = Gauge("tlcv_open_connections", "Open HTTP connections", registry=r)
        self.connections_closed = Counter("tlcv_connections_closed", "Connections the server closed to hold its limits",
                                          ["reason"], registry=r)
        self.budget_used = Gauge("tlcv_budget_in_use", "Amount of a memory budget in use", ["budget"], registry=r)
        self.budget_peak = Gauge("tlcv_budget_peak", "Most of a memory budget ever in use at once", ["budget"], registry=r)
        self.budget_waiting = Gauge("tlcv_budget_waiting", "Requests waiting for a memory budget", ["budget"], registry=r)

    def observe_batch(self, seconds: float, images: int):
        self.inference.observe(seconds)
        self.batch_size.observe(images)
        self.images.inc(images)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def endpoint_label(path: str) -> str:
    if path.startswith("/v2/models/"):
        for suffix in ("infer", "ready"):
            if path.endswith("/" + suffix):
                return "v2_" + suffix
        return "v2_model_metadata"
    if path.startswith("/v2/health/"):
        return "v2_health"
    return {"/v1/predict": "v1_predict", "/metrics": "metrics", "/v2": "v2_server_metadata"}.get(path, "other")
