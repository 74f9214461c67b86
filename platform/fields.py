"""Field metadata of the typed config sections: the numeric bounds :func:`brainiac.platform.config.from_dict` checks."""

from __future__ import annotations

__all__ = ["bounds"]


def bounds(
    *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> dict[str, float]:
    """``dataclasses.field(metadata=bounds(ge=0.0, le=1.0))``: the loader refuses a value (or any item of a list value)
    outside ``>= ge``, ``> gt``, ``<= le``, ``< lt``, naming its key. Sections of every layer use it, so it lives in the
    foundation and imports nothing."""
    return {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
