"""Host-side exporters: ONNX graphs and bundles (needs torch and onnx).

`edgefa.exporters.bundle_from_module` and `bundle_from_onnx` (own_model.py) are imported on first
use, so that importing a torch-free part of this package (tensorrt_ready) never imports torch.
"""

_LAZY = {"bundle_from_module": "own_model", "bundle_from_onnx": "own_model", "export_bundle": "export"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
