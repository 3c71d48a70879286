"""Settings and the model reference: read once in each entry point, then passed down."""

from config.models import ModelKind, ModelReference, ModelSpec, load_model_reference
from config.settings import Settings

__all__ = ["ModelKind", "ModelReference", "ModelSpec", "Settings", "load_model_reference"]
