"""worldserve engine: the world model, its KV cache and attention policies, and the World API (pure PyTorch).

Public API (what `server` and tools may import):
"""

from engine.actions import IDLE, Action, ActionSpace
from engine.checkpoint import CheckpointError, load_checkpoint, read_model_config, save_checkpoint
from engine.config import ATTENTION_PRESETS, ConfigError, WorldConfig, load_config, parse_config, with_overrides
from engine.model import WorldModel
from engine.policies import CacheFull
from engine.world import World, WorldStats
from engine.world_engine import WorldEngine

__all__ = [
    "ATTENTION_PRESETS",
    "IDLE",
    "Action",
    "ActionSpace",
    "CacheFull",
    "CheckpointError",
    "ConfigError",
    "World",
    "WorldConfig",
    "WorldEngine",
    "WorldModel",
    "WorldStats",
    "load_checkpoint",
    "load_config",
    "parse_config",
    "read_model_config",
    "save_checkpoint",
    "with_overrides",
]
