"""wmjax: JAX/Flax "Wonderful Matrices" language models (Doge; Cheems, OTCE, Om to come) with GPU Pallas kernels."""

from wmjax.config import ConfigError, DogeConfig, PRESETS

__all__ = ["ConfigError", "DogeConfig", "PRESETS"]
__version__ = "0.1.0"
