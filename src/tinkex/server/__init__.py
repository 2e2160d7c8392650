"""The tinkex server: a Tinker-compatible HTTP service over the local engine."""

from .app import create_app
from .embedded import EmbeddedServer, default_data_dir
from .runtime import ServerSettings

__all__ = ["EmbeddedServer", "ServerSettings", "create_app", "default_data_dir"]
