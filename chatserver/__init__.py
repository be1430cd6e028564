"""chatserver: a horizontally scalable WebSocket chat server on aiohttp and Redis."""

__version__ = "0.1.0"
