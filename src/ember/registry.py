"""Name -> "module:Class" registries whose classes are imported only when one is created."""

from __future__ import annotations

import importlib
from typing import Any


def create_registered(registry: dict[str, str], name: str, kind: str, *args: Any) -> Any:
    """An instance of the class `registry[name]` names, built with `args`.

    Raises:
        ValueError: `name` is not registered (the message lists the known names of this `kind`).
    """
    target = registry.get(name)
    if target is None:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(registry)}")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)(*args)
