"""Serving: an HTTP inference server for the exported ONNX model (no torch), its image and manifests."""
