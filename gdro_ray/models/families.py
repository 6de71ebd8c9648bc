"""Which model family a checkpoint belongs to. Each module of this package that declares FAMILY (a
ModelFamily) is one: adding a family is adding its module.

A local directory is recognised by its model_index.json, a hub id by its name (each family's hub_names) or,
failing that, by the model_index.json the hub serves.
"""

import functools
import importlib
import json
import pkgutil
import re
from pathlib import Path

from gdro_ray.models.base import ModelFamily

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@functools.cache
def model_families() -> dict[str, ModelFamily]:
    """Every family, by the pipeline class of its checkpoints."""
    families = {}
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        family = getattr(importlib.import_module(f"{__package__}.{module.name}"), "FAMILY", None)
        if isinstance(family, ModelFamily):
            families[family.pipeline_class] = family
    return families


def check_model_source(source: str) -> None:
    """Refuse, before any work starts, a model that is neither a diffusers directory nor a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model path {source!r} is not a diffusers pipeline: it has no model_index.json")
    elif path.exists() or not HUB_ID.match(source):
        raise FileNotFoundError(
            f"model {source!r} is neither a diffusers pipeline directory nor a hub id like 'black-forest-labs/FLUX.1-dev'"
        )


def family_of(source: str, revision: str | None = None) -> ModelFamily:
    """The family of a diffusers directory or a hub id; one of no known family is refused, naming them."""
    check_model_source(source)
    families = model_families()
    path = Path(source).expanduser()
    if path.is_dir():
        pipeline_class = json.loads((path / "model_index.json").read_text()).get("_class_name")
    else:
        named = [family for family in families.values() if re.search(family.hub_names, source)]
        if len(named) == 1:
            return named[0]
        pipeline_class = hub_pipeline_class(source, revision)
    if pipeline_class not in families:
        known = ", ".join(f"{family.name} ({cls})" for cls, family in sorted(families.items()))
        raise ValueError(f"model {source!r} is a {pipeline_class}; gdro-ray knows these families: {known}")
    return families[pipeline_class]


def hub_pipeline_class(hub_id: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(hub_id, "model_index.json", revision=revision)
    except Exception as error:  # offline, gated or missing: say which model and why
        raise OSError(f"could not read {hub_id!r}'s model_index.json from the hub to tell its model family "
                      f"(a local directory needs no network): {error}") from error
    return json.loads(Path(index).read_text()).get("_class_name")
