"""The soak bench's app (see bench/apps.py); a module of its own so its import string is short."""

from bench.apps import soak as app

__all__ = ["app"]
