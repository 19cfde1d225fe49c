"""`mesh-ctl moe`: expert importance (`_analyze`: real activations or weight norms, split plans)
and expert-sharded GGUFs with their fidelity gate (`_shards`)."""

from actors.moe._analyze import (
    UnsupportedModel,
    activation_importance,
    moe_info,
    plan_split,
    weight_importance,
)
from actors.moe._shards import Gate, split_model, stderr_progress

__all__ = [
    "Gate",
    "UnsupportedModel",
    "activation_importance",
    "moe_info",
    "plan_split",
    "split_model",
    "stderr_progress",
    "weight_importance",
]
