"""The VESSA assistant network, in the style of segment-anything's modeling files."""

from assistant_server.modeling.foundation import (
    LiteMedSAMWeightsError,
    build_foundation,
    load_foundation_weights,
)
from assistant_server.modeling.vessa import VessaConfig, VessaModel, VessaOutput

__all__ = [
    "LiteMedSAMWeightsError",
    "VessaConfig",
    "VessaModel",
    "VessaOutput",
    "build_foundation",
    "load_foundation_weights",
]
