from .mlp import MLP, MLPConfig

__all__ = ["MLP", "MLPConfig"]
