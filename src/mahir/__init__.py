"""mahir: make a trained model run faster and cheaper without changing its answers."""

from __future__ import annotations

__version__ = "0.1.0"
