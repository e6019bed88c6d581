"""``kvp-mlx serve``: an OpenAI-compatible local server (mlx-lm server's endpoints) whose requests are
prefilled with KV Prediction, reuse cached sessions by token prefix, and whose sessions are repaired
to exact K/V while the server is idle. See :mod:`kvp_mlx.server.app`."""

from kvp_mlx.server.app import KVPServer, ServerConfig
from kvp_mlx.server.prompt_cache import SessionCache
from kvp_mlx.server.worker import Worker

__all__ = ["KVPServer", "ServerConfig", "SessionCache", "Worker"]
