from blip_jax.models.blip import Blip
from blip_jax.models.config import BlipConfig, TextConfig, VisionConfig, make_config, tiny_config

__all__ = ["Blip", "BlipConfig", "TextConfig", "VisionConfig", "make_config", "tiny_config"]
