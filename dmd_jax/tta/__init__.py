"""Online test-time adaptation (METHODS.md §2-3): CEMA and the baselines it is compared with.

**The method protocol.** A method is a module, `dmd_jax.tta.<name>` or any importable
dotted path, exporting `Method`: a class built as `Method(edge, cfg, context)` from the
edge model split for adaptation (`adaptable.Adaptable`), its own config section and a
`base.Context` (mesh, seed, and loaders for the cloud model and for clean clips), which
declares `SETTINGS`, the keys of that section, and has `reset()` and `process(clips) ->
base.BatchResult`: the predictions made *before* the batch changed anything (the scored
ones), and what it learnt from, uploaded and sent.

In `config.adapt`, `methods` lists names; a name is either a method module with its
section `config.adapt.<name>` (`tent`, `eata`, `sar`, `cema`, `lame`; `source` and `norm`
have none), or a variant in `config.adapt.variants`: `{method: <module>, **overrides of its
section}` (`cloud_all` is CEMA with `upload_all=True`). `build` resolves both. A method
built on another declares `EXTENDS` and takes that method's section as well as its own
(`dmd_cema`: CEMA's settings and its offloading ones).

Modules: `adaptable` (norm affine parameters vs the frozen rest), `losses` and `filters`
(entropy weights, distillation, EATA's filters), `renorm` (test-time BatchNorm as
interceptors), `base` (results, context, the gradient machinery), and one per method.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dmd_jax import plugins
from dmd_jax.errors import UserError
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import Context, Method

# Keys of config.adapt that are not method sections.
JOB_KEYS = ("split", "protocol", "corruptions", "severities", "methods", "batch_size", "seeds",
            "collapse_fraction", "log_every", "checkpoint_every", "differences",
            "bootstrap_resamples", "variants")


class MethodConfigError(UserError, ValueError):
    """A method's config section does not match the settings it takes."""


def method_settings(adapt: ml_collections.ConfigDict, name: str) -> tuple[str, dict[str, Any]]:
    """`(implementation, settings)` of method `name` of `config.adapt`: a variant's
    implementation and its section with the variant's overrides, or `name` itself. A
    method whose class names `EXTENDS` (`dmd_cema`: 'cema') takes that method's section
    too, its own section adding the settings it alone has (a key in both is refused)."""
    variants = adapt.get("variants") or {}
    overrides = dict(variants[name]) if name in variants else {}
    implementation = overrides.pop("method", name)
    settings = _section(adapt, implementation)
    extends = getattr(plugins.resolve(implementation, __name__, f"adaptation method {name!r}",
                                      ("Method",)).Method, "EXTENDS", None)
    if extends:
        inherited = _section(adapt, extends)
        twice = sorted(set(inherited) & set(settings))
        if twice:
            raise MethodConfigError(
                f"config.adapt.{implementation} sets {twice}, which it takes from "
                f"config.adapt.{extends}: set them there, or in a variant")
        settings = {**inherited, **settings}
    return implementation, {**settings, **overrides}


def _section(adapt: ml_collections.ConfigDict, implementation: str) -> dict[str, Any]:
    section = adapt.get(implementation) if "." not in implementation else None
    return section.to_dict() if section is not None else {}


def build(adapt: ml_collections.ConfigDict, name: str, edge: Adaptable,
          context: Context) -> Method:
    """Method `name` of `config.adapt`, checked against the settings its class declares."""
    implementation, settings = method_settings(adapt, name)
    module = plugins.resolve(implementation, __name__, f"adaptation method {name!r}",
                             ("Method",))
    expected = set(module.Method.SETTINGS)
    missing, extra = sorted(expected - set(settings)), sorted(set(settings) - expected)
    where = (f"config.adapt.variants.{name} over config.adapt.{implementation}"
             if implementation != name else f"config.adapt.{name}")
    if missing or extra:
        raise MethodConfigError(
            f"{where} does not match the settings of {implementation!r}: missing {missing}, "
            f"not taken {extra}; it takes {sorted(expected)}")
    return module.Method(edge, ml_collections.ConfigDict(settings), context)


def check(adapt: ml_collections.ConfigDict) -> None:
    """Every method of `config.adapt.methods` resolves, before any work starts."""
    if not adapt.methods:
        raise MethodConfigError("config.adapt.methods is empty; name at least one method")
    unknown_sections = sorted(k for k in adapt if k not in JOB_KEYS and not _is_method(k))
    if unknown_sections:
        raise MethodConfigError(f"config.adapt.{unknown_sections[0]} is neither a setting of "
                                f"the adapt job nor an adaptation method's section")
    for name in adapt.methods:
        implementation, _ = method_settings(adapt, name)
        plugins.resolve(implementation, __name__, f"adaptation method {name!r}", ("Method",))


def _is_method(name: str) -> bool:
    try:
        plugins.resolve(name, __name__, "", ("Method",))
    except plugins.PluginNotFoundError:
        return False
    return True
