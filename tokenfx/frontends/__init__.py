"""Frontends: capture (torch.export), the torch.compile backend, loading, ONNX export."""
