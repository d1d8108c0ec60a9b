"""Plugins: models and attacks registered from outside the package, without touching it.

Two ways, both loaded before a config is validated:

- **entry points**: a package declares, in its ``pyproject.toml``,

      [project.entry-points."medrobust.models"]
      my_lab = "my_lab.models"
      [project.entry-points."medrobust.attacks"]
      my_lab = "my_lab.attacks"

  and every installed package's entry points of these two groups are imported once per process
  (``load_entry_points``), which registers what the modules hold (``@register_model``, ``@register_attack``);
- **a config's** ``plugins = ["my_lab.models", "path/to/attacks.py"]``: modules by import name, or Python files
  by path (relative to the current directory), imported before the config's model and attack names are checked,
  in every Ray worker too (``import_plugins``).

The source files of every registered model and attack (the package's own and the plugins') are part of a run's
plan-cache key (``registered_source_files``), so a changed plugin is planned again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from medrobust.errors import MedrobustError

GROUPS = ("medrobust.models", "medrobust.attacks")


@functools.cache
def load_entry_points() -> tuple[str, ...]:
    """Import every installed plugin of the groups ``medrobust.models`` and ``medrobust.attacks`` (once per
    process); returns their names. A plugin that fails to import is one error naming it."""
    loaded = []
    for group in GROUPS:
        for entry in importlib.metadata.entry_points(group=group):
            try:
                entry.load()
            except Exception as error:  # a broken plugin: one line naming it, never a traceback
                raise MedrobustError(f"plugin {entry.name!r} ({group} = {entry.value!r}) failed to load: "
                                     f"{type(error).__name__}: {error}") from None
            loaded.append(f"{group}:{entry.name}")
    return tuple(loaded)


def import_plugin(spec: str, where: str = "plugins") -> ModuleType:
    """Import one plugin: a module by its import name, or a Python file by its path (``.py``). ``where`` names the
    setting in errors (e.g. ``config.toml: plugins[0]``)."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise MedrobustError(f"{where}: no Python file at {spec!r}")
        # Named by the file's path and content: the same file is imported once, a changed one afresh.
        digest = hashlib.sha256(str(path).encode() + path.read_bytes()).hexdigest()[:16]
        name = f"medrobust_plugin_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise MedrobustError(f"{where}: importing {spec} failed: {type(error).__name__}: {error}") from None
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if error.name and spec.startswith(error.name):
            raise MedrobustError(f"{where}: no module named {spec!r} (install it, or give the path of its .py "
                                 f"file)") from None
        raise MedrobustError(f"{where}: importing {spec} failed: {type(error).__name__}: {error}") from None
    except MedrobustError as error:
        raise MedrobustError(f"{where}: importing {spec} failed: {error}") from None
    except Exception as error:
        raise MedrobustError(f"{where}: importing {spec} failed: {type(error).__name__}: {error}") from None


def import_plugins(specs: Iterable[str], where: str = "plugins") -> list[ModuleType]:
    """The installed entry-point plugins, then each of ``specs`` (see ``import_plugin``)."""
    load_entry_points()
    return [import_plugin(spec, f"{where}[{i}]") for i, spec in enumerate(specs)]


def registered_source_files() -> list[Path]:
    """The source file of every registered model factory and attack class, sorted: what decides a grid's cells
    besides the config (an attack's defaults and threat models, a model's architecture)."""
    from medrobust.attacks import attack_entrypoint, list_attacks
    from medrobust.models import list_models, model_entrypoint

    entries = [attack_entrypoint(name) for name in list_attacks()] + [model_entrypoint(name) for name in list_models()]
    files = set()
    for entry in entries:
        try:
            source = inspect.getsourcefile(getattr(entry, "__wrapped__", entry))
        except TypeError:  # a builtin or a C extension: nothing to read
            continue
        if source:
            files.add(Path(source).resolve())
    return sorted(files)
