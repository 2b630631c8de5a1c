"""Building the frozen dataclass configs of `ldm_jax.configs` from JSON objects, field by field: an unknown field or
a value of the wrong type is a ValueError naming it (config.json of converted directories, --config files, the
config stored in a checkpoint's header)."""

from __future__ import annotations

import dataclasses


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# what a JSON value must be for each field annotation of the config dataclasses (strings: postponed annotations)
_TYPE_CHECKS = {
    "int": _is_int,
    "int | None": lambda v: v is None or _is_int(v),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "tuple[int, ...]": lambda v: isinstance(v, tuple) and all(_is_int(x) for x in v),
}


def from_fields(cls, d, where: str, nested: dict | None = None):
    """cls(**d) for a JSON object `d` (absent fields keep their defaults); a ValueError naming the field for
    what is not an object, an unknown field or a value of the wrong type. `nested` builds sub-config fields."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for k, v in d.items():
        if nested and k in nested:
            kwargs[k] = nested[k](v, f"{where}.{k}")
            continue
        v = tuple(v) if isinstance(v, list) else v
        if not _TYPE_CHECKS[fields[k].type](v):
            raise ValueError(f"{where}.{k}: expected {fields[k].type}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)
