"""A user metric for the optimize tests: agreement with saved reference outputs, so strict that
only bit-exact candidates meet a zero drop."""

from __future__ import annotations

from typing import Any

import numpy as np


def exactness(outputs: dict[str, Any], data: dict[str, np.ndarray]) -> float:
    """Minus the largest difference from the reference: 0.0 only for the same numbers."""
    return -float(np.abs(outputs["output"] - data["reference"]).max())
