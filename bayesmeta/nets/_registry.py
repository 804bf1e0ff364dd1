"""One rule for the package's registries of classes by name (backbones, likelihoods, guides)."""

from __future__ import annotations

__all__ = ["add"]


def add(registry: dict[str, type], name: str, cls: type, what: str) -> type:
    """Put ``cls`` in ``registry`` under ``name``; a name taken by another class is refused
    (``ValueError``), the same class defined again (a notebook cell run twice) replaces it."""
    taken = registry.get(name, cls)
    same = (taken.__module__, taken.__qualname__) == (cls.__module__, cls.__qualname__)
    if taken is not cls and not same:
        raise ValueError(f"the {what} name {name!r} is taken by {taken.__name__}")
    registry[name] = cls
    return cls
