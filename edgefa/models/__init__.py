"""Host models. `mlp` is the spine's MLP (exported to the device); the others share FeedbackNet."""

from .cnn import CNN
from .feedback_net import FeedbackNet, NetConfig
from .mlp import MLP, MLPConfig
from .resmlp import ResMLP
from .transformer import CausalTransformer
from .vit import ViTMini

NETS = {"resmlp": ResMLP, "cnn": CNN, "vit": ViTMini, "transformer": CausalTransformer}
MODEL_KINDS = ("mlp", *NETS)


def model_from_config(config: dict):
    """Rebuild a model from its saved config dict (`kind` absent means the MLP)."""
    config = dict(config)
    kind = config.get("kind", "mlp")
    if kind == "mlp":
        config.pop("kind", None)
        return MLP(MLPConfig(**config))
    if kind not in NETS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")
    return NETS[kind](NetConfig(**config))


__all__ = ["CNN", "CausalTransformer", "FeedbackNet", "MLP", "MLPConfig", "MODEL_KINDS", "NETS", "NetConfig",
           "ResMLP", "ViTMini", "model_from_config"]
