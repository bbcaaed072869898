"""The methods, by config name: `get_method(cfg.method)`.

A method is one module of this package plus its config fields plus one line here; a
module is imported only when its method is asked for.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Method

_REGISTRY = {  # name -> "module:attribute" of its `Method` (a module of this package, or a dotted path)
    "supervised": "self_training:SUPONLY",
    "st": "self_training:ST",
    "stpp": "self_training:STPP",
    "mean_teacher": "mean_teacher:MEAN_TEACHER",
    "u2pl": "u2pl:U2PL",
    "dmt": "dmt:DMT",
    "unimatch": "unimatch:UNIMATCH",
}


def names() -> tuple[str, ...]:
    """Every method's config name, in the order of the comparison table."""
    return tuple(_REGISTRY)


def get_method(name: str) -> "Method":
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(_REGISTRY)}")
    module, attribute = _REGISTRY[name].split(":")
    return getattr(import_module(module if "." in module else f"{__name__}.{module}"), attribute)


def online_names() -> tuple[str, ...]:
    """The methods that train on an unlabeled stream (no SupOnly teacher)."""
    return tuple(n for n in _REGISTRY if get_method(n).online)
