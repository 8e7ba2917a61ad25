"""Attention zoo: Flax NNX models on Pallas attention kernels, and the platform that trains them."""
from zoo import axes  # noqa: F401  (switches off flax eager sharding before any model is built)
from zoo.registry import (count_params, create_model, list_models, model_card,  # noqa: F401
                          register_model)

__all__ = ["create_model", "list_models", "model_card", "register_model", "count_params"]
