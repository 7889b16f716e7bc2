"""Model registry, presets and the safe model-directory format (``config.json`` + ``model.safetensors``)."""

from neuromoe.models.registry import (
    PretrainedMixin,
    create_model,
    list_models,
    load_model,
    register_model,
    save_model,
)

__all__ = ["PretrainedMixin", "create_model", "list_models", "load_model", "register_model", "save_model"]
