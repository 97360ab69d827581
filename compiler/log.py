"""Logging under the ``deepfuse`` logger.

``DEEPFUSE_LOG=info`` prints one line per match and per declined candidate (with the reason and the user's
source line); ``DEEPFUSE_LOG=debug`` also prints the graph before and after each pass.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("deepfuse")


def _configure() -> None:
    level = os.environ.get("DEEPFUSE_LOG", "").strip().upper()
    if not level:
        return
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        level = "INFO"
    log.setLevel(level)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[deepfuse %(levelname)s] %(message)s"))
        log.addHandler(handler)
        log.propagate = False


_configure()
