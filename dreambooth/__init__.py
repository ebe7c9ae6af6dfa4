"""DreamBooth for the AUTOMATIC1111 web UI: the engine, host-agnostic."""

__version__ = "0.1.0"
