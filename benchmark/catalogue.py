"""What is registered (the package's models and attacks and the plugins'), described as data: ``medrobust
list``."""

from __future__ import annotations

from medrobust.errors import MedrobustError


def describe(kind: str) -> list[dict]:
    """The registered ``models``, ``segmenters`` or ``attacks`` (plugins included) as JSON-native records: name,
    the first paragraph of the docstring, the parameters with their defaults; a model's ``requires``, an attack's
    norms, threat models, role and scope (``medrobust list``)."""
    import inspect

    if kind == "segmenters":
        from medrobust.models.segmenter import list_segmenters, segmenter_entrypoint

        entries = {name: segmenter_entrypoint(name) for name in list_segmenters()}
    elif kind == "models":
        from medrobust.models import list_models, model_entrypoint, model_requires

        entries = {name: model_entrypoint(name) for name in list_models()}
    elif kind == "attacks":
        from medrobust.attacks import attack_entrypoint, list_attacks

        entries = {name: attack_entrypoint(name) for name in list_attacks()}
    else:
        raise MedrobustError(f"kind must be models, segmenters or attacks, got {kind!r}")
    described = []
    for name, entry in entries.items():
        doc = inspect.getdoc(entry) or ""
        item = {"name": name, "description": " ".join(doc.split("\n\n")[0].split())}
        if kind == "models":
            parameters = list(inspect.signature(entry).parameters.values())
            item["requires"] = list(model_requires(name))
            item["needs"] = getattr(entry, "package", "") or None  # an optional package (MONAI's networks)
        elif kind == "segmenters":
            parameters = list(inspect.signature(entry).parameters.values())
        else:
            parameters = list(entry.argument_parameters().values())
            item.update(norms=list(entry.norms), threat_models=list(entry.threat_models), role=entry.role,
                        scope=entry.scope)
        item["parameters"] = {p.name: _jsonable(p.default) for p in parameters
                              if p.name not in ("self", "model") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        described.append(item)
    return described


def _jsonable(value):
    """A parameter's default as JSON holds it (a Budget as its dict, no default as null)."""
    import inspect

    if value is inspect.Parameter.empty:
        return None
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, tuple):
        return list(value)
    return value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
