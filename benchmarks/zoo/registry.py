"""The zoo's members: every module of zoo.models that defines MODEL, found by name."""
from __future__ import annotations

import importlib
import pkgutil

from . import models
from .base import ZooModel


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}"


def discover() -> tuple[list[tuple[str, ZooModel]], list[tuple[str, str]]]:
    """(module name, model) for every module that defines MODEL, and (module name, error) for the rest."""
    found, broken = [], []
    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda i: i.name):
        try:
            module = importlib.import_module(f"{models.__name__}.{info.name}")
            model = getattr(module, "MODEL")
            if not isinstance(model, ZooModel):
                raise TypeError(f"MODEL is a {type(model).__name__}, not a ZooModel")
            found.append((info.name, model))
        except Exception as err:  # one broken module must not stop the others
            broken.append((info.name, one_line(err)))
    return found, broken


def members(names: str | None = None) -> list[ZooModel]:
    """The members named in a comma-separated list (all when None); an unknown name is an error."""
    found = {model.name: model for _, model in discover()[0]}
    if names is None:
        return list(found.values())
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise SystemExit(f"unknown zoo member(s): {', '.join(unknown)}; known: {', '.join(sorted(found))}")
    return [found[name] for name in wanted]
