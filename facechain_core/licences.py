"""The licence of every model the pack uses, and the commercial-only setting that refuses the others.

Licences are data: each model's SPDX expression sits beside its source in ``data/models.json`` (``?`` where it
is unknown), and ``data/licences.json`` lists the licences that allow commercial use and which models each
step's choices use. With ``FACECHAIN_COMMERCIAL_ONLY=1`` in the environment, the model store refuses any model
whose licence is not on that list, or unknown, with an error naming the model, its licence and what to use
instead. ``describe`` is the one place node reports and the LoRA metadata get their licence text from.
"""

from __future__ import annotations

import json
import os
import re

from . import data_files
from .errors import FaceChainError

ENV = "FACECHAIN_COMMERCIAL_ONLY"
UNKNOWN = "?"


def _data() -> dict:
    return data_files.load("licences.json")


def commercial_only() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _entries() -> dict[str, dict]:
    """Every model with a licence: the learned and embedded entries of models.json, then the embedded files
    that ``facechain_core.embedded`` fetches (when that module is there)."""
    from . import model_store

    cat = model_store.catalogue()
    out = {**_data().get("other", {}), **cat.get("embedded", {}), **cat.get("learned", {})}
    for item in _embedded_status():
        out.setdefault(item["name"], {"licence": item.get("licence") or UNKNOWN,
                                      "licence_source": item.get("source", ""), "task": item.get("task", "")})
    return out


def _embedded_status() -> list[dict]:
    from . import model_store

    module = model_store.embedded_module()
    return list(module.status()) if module is not None else []


def record(name: str) -> dict:
    """``{"name", "licence", "commercial", "source", "alternative"}`` of one model; unknown names get ``?``."""
    entry = _entries().get(name, {})
    licence = entry.get("licence") or UNKNOWN
    return {"name": name, "licence": licence, "commercial": is_commercial_friendly(licence),
            "source": entry.get("licence_source", ""), "alternative": entry.get("alternative", "")}


def is_commercial_friendly(expression: str) -> bool:
    """True for an SPDX expression whose every AND part (or any OR part) is on the commercial-friendly list."""
    expression = (expression or "").strip()
    if not expression or expression == UNKNOWN:
        return False
    friendly = set(_data()["commercial_friendly"])
    alternatives = re.split(r"\s+OR\s+", expression.strip("() "))
    return any(all(part.strip("() ") in friendly for part in re.split(r"\s+AND\s+", alt)) for alt in alternatives)


def verdict(licence: str) -> str:
    if licence == UNKNOWN:
        return "licence unknown: check before commercial use"
    return "commercial use allowed" if is_commercial_friendly(licence) else "NOT for commercial use"


def describe(names) -> str:
    """One line for a report: each model with its licence and what that means for commercial use."""
    names = list(dict.fromkeys(names))
    if not names:
        return "Models: none (classical code only, nothing with a licence of its own)"
    parts = [f"{r['name']} ({r['licence']}, {verdict(r['licence'])})" for r in map(record, names)]
    return "Models: " + "; ".join(parts)


def metadata(names) -> dict[str, str]:
    """Safetensors metadata naming the models used and their licences (strings only, as safetensors wants)."""
    recs = [record(n) for n in dict.fromkeys(names)]
    return {"facechain_models": json.dumps([{"name": r["name"], "licence": r["licence"]} for r in recs]),
            "facechain_licences": describe(names)}


def models_for(**choices: str) -> list[str]:
    """The models a step uses for a choice, e.g. ``models_for(rank="arcface")`` or
    ``models_for(tagger="auto", subject="input")``; ``name?`` entries only when that model is installed."""
    from . import model_store

    steps = _data()["steps"]
    out: list[str] = []
    for step, choice in choices.items():
        for name in steps.get(step, {}).get(str(choice), []):
            if name.endswith("?"):
                name = name[:-1]
                if not model_store.is_present(name):
                    continue
            out.append(name)
    return list(dict.fromkeys(out))


def line(**choices: str) -> str:
    """``describe(models_for(**choices))``: the licence line a node appends to its report."""
    return describe(models_for(**choices))


def check_allowed(name: str) -> None:
    """Under ``FACECHAIN_COMMERCIAL_ONLY=1``, refuse a model whose licence is not commercial-friendly or unknown."""
    if not commercial_only():
        return
    r = record(name)
    if r["commercial"]:
        return
    why = "its licence is unknown" if r["licence"] == UNKNOWN else f"its licence ({r['licence']}) is not " \
          f"commercial-friendly"
    instead = r["alternative"] or "the node's 'embedded' backend"
    raise FaceChainError(
        f"The model '{name}' is refused because {ENV}=1 is set and {why}"
        f"{' (' + r['source'] + ')' if r['source'] else ''}. Use {instead} instead, or unset {ENV} if your use "
        f"is not commercial.")
