"""YAML for configs and manifests: safe loading, with ``1e-3``-style floats (YAML 1.2 reads them as
floats; PyYAML's YAML 1.1 resolver would return the string "1e-3")."""
from __future__ import annotations

import re

import yaml


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; configs mean a float, as YAML 1.2 does."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str):
    """Parse config YAML (files and ``key=value`` override values) with 1e-3-style floats."""
    return yaml.load(text, Loader=_ConfigLoader)


__all__ = ["load_yaml"]
