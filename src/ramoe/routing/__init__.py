"""Router capture for Mixture-of-Experts models in Hugging Face transformers.

``adapters`` locates the router of every MoE layer and states how each model family scores
and selects experts. ``capture`` records router logits with forward hooks, during a plain
forward pass or during ``generate``.
"""

from ramoe.routing.adapters import MoELayout, NoMoELayersError, UnsupportedMoEModelError, describe_moe
from ramoe.routing.capture import RouterCapture, per_sequence

__all__ = [
    "MoELayout",
    "NoMoELayersError",
    "RouterCapture",
    "UnsupportedMoEModelError",
    "describe_moe",
    "per_sequence",
]
