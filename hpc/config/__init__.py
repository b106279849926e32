"""Configuration: the schema, composition of configs/ with CLI overrides, and its errors."""

from hpc.config.compose import available, compose, from_yaml, to_yaml
from hpc.config.errors import ConfigError
from hpc.config.schema import Config

__all__ = ["Config", "ConfigError", "available", "compose", "from_yaml", "to_yaml"]
