"""The method registry: the one place where a recipe's `method:` name becomes a class.

The training loop knows no method by name. A method module decorates its `Method`
subclass with `@register_method("name")`; the packages `genforge.methods` (the generic
tasks), `genforge.kd` (the knowledge-transfer families) and `genforge.sd` (SD compression) import their modules so that
importing them registers all built-in methods. The registry imports those packages the
first time a name is missing (or the list is asked for), so
`load_recipe("recipes/dimr/digits.yaml")` works without the caller importing anything.
Registering a name twice is an error, never a silent overwrite.
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["RegistryError", "register_method", "get_method", "available_methods"]

_BUILTIN_PACKAGES = ("genforge.methods", "genforge.kd", "genforge.sd")
_METHODS: dict[str, type] = {}
_builtins_imported = False


class RegistryError(ValueError):
    """A method name is unknown or registered twice."""


def register_method(name: str):
    """Class decorator: register a `Method` subclass under `name` and set `cls.name`."""
    if not isinstance(name, str) or not name:
        raise RegistryError(f"a method name must be a non-empty string, got {name!r}")

    def decorator(cls: type) -> type:
        existing = _METHODS.get(name)
        if existing is not None and existing is not cls:
            raise RegistryError(
                f"method '{name}' is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; cannot register "
                f"{cls.__module__}.{cls.__qualname__} under the same name")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _import_builtin_methods() -> None:
    """Import the built-in method packages once (those that exist), so their methods register."""
    global _builtins_imported
    if _builtins_imported:
        return
    for package in _BUILTIN_PACKAGES:
        if importlib.util.find_spec(package) is not None:
            importlib.import_module(package)
    _builtins_imported = True


def available_methods() -> list[str]:
    """Sorted names of all registered methods (built-in ones included)."""
    _import_builtin_methods()
    return sorted(_METHODS)


def get_method(name: str) -> type:
    """The `Method` class registered under `name`; RegistryError listing the known names."""
    if name not in _METHODS:
        _import_builtin_methods()
    if name not in _METHODS:
        known = ", ".join(sorted(_METHODS)) or "(none registered)"
        raise RegistryError(f"unknown method '{name}'; registered methods: {known}")
    return _METHODS[name]
