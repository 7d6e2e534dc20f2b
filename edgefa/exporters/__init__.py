"""Host-side exporters: ONNX graphs and bundles (needs torch and onnx)."""
