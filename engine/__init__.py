"""worldserve engine: the world model, its KV cache and attention policies, and the World API (pure PyTorch).

Public API (what `server` and tools may import):
"""

from engine.config import ConfigError, WorldConfig, load_config, parse_config

__all__ = ["ConfigError", "WorldConfig", "load_config", "parse_config"]
