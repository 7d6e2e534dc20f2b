"""The device runtime: numpy + onnxruntime, never torch."""
