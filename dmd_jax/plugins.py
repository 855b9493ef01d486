"""Finding models, routers and adaptation methods by name: the one way to extend dmd_jax.

A config names an implementation by a short name, found by convention in dmd_jax's own
package (`model.name="x3d"` is the module `dmd_jax.models.x3d`), else as a module of that
name on the Python path, or by the dotted path of any importable module
(`model.name="my_lab.models.tiny_edge"`), so a new model, router or method is a new file
that follows its protocol, never an edit to a list in dmd_jax. The
protocols are documented where they are used: `dmd_jax.models`, `dmd_jax.routers`,
`dmd_jax.tta`.
"""

from __future__ import annotations

import importlib
import pkgutil
import types

from dmd_jax.errors import UserError


class PluginNotFoundError(UserError, ValueError):
    """A config names a model, router or method that no module provides."""


def resolve(name: str, package: str, what: str, exports: tuple[str, ...]) -> types.ModuleType:
    """The module `package.name` (a bare name) or `name` (a dotted path), checked to export
    every attribute in `exports`; `what` names the kind in errors ('config.model.name')."""
    if not name or not all(part.isidentifier() for part in name.split(".")):
        raise PluginNotFoundError(f"{what}={name!r} is not a module name; available: "
                                  f"{available(package, exports)} or a dotted module path")
    candidates = [name] if "." in name else [f"{package}.{name}", name]
    module = None
    for path in candidates:
        try:
            module = importlib.import_module(path)
            break
        except ModuleNotFoundError as err:
            if err.name is None or not path.startswith(err.name):
                raise  # the module exists but one of its own imports is missing: a real bug
    if module is None:
        raise PluginNotFoundError(
            f"{what}={name!r}: no module {' or '.join(map(repr, candidates))}; available: "
            f"{available(package, exports)}, or the dotted path of a module of yours that "
            "follows the protocol")
    missing = [attr for attr in exports if not hasattr(module, attr)]
    if missing:
        raise PluginNotFoundError(f"{what}={name!r}: module {path!r} does not export "
                                  f"{missing} (see the protocol in {package})")
    return module


def available(package: str, exports: tuple[str, ...]) -> list[str]:
    """The short names `package` provides: its public modules that export `exports`."""
    pkg = importlib.import_module(package)
    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{package}.{info.name}")
            if all(hasattr(module, attr) for attr in exports):
                names.append(info.name)
    return sorted(names)
