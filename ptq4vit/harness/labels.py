"""How runs are named in tables and plots: bit settings, methods, and the order of models and bits."""
from __future__ import annotations

import re
from typing import Iterable


def bits_label(r: dict) -> str:
    return f"W{r['w_bits']}A{r['a_bits']}"


def method_label(r: dict) -> str:
    ov = r.get("overrides") or {}
    if not ov:
        return r["preset"]
    return r["preset"] + "[" + ",".join(f"{k}={v}" for k, v in sorted(ov.items())) + "]"


def bits_order(b: str) -> tuple:
    w, a = b[1:].split("A")
    return (-int(w), -int(a))


def model_order(models: Iterable[str]) -> list[str]:
    from .zoo import MODELS
    order = {e.short: i for i, e in enumerate(MODELS)}
    return sorted(set(models), key=lambda m: (order.get(m, len(order)), m))


def slug(text: str) -> str:
    """``text`` as a file-name part: runs of anything but letters, digits and dots become one dash."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")
