"""From a recipe to what trains: the MKB plan (probed, or read from a `clcli probe --json` file), the input size and
normalisation taken from a pretrained config, and where each network's starting weights come from."""
from __future__ import annotations

from pathlib import Path

from clcli import files
from clcli.errors import ClcliError


def resolve_pretrained_input(recipe) -> list[str]:
    """input_size None becomes the first model's pretrained input size (images are decoded at that size). Returns
    notes for the user: what was taken from the pretrained config, and which models were pretrained otherwise."""
    from clcli import models

    if recipe.input_size is not None and recipe.data.normalize != "pretrained":
        return []
    first = recipe.models[0]
    configs = {name: models.pretrained_config(name) for name in dict.fromkeys(recipe.models)}
    ref = configs[first]
    notes = []
    if recipe.input_size is None:
        recipe.input_size = max(ref["input_size"])
        notes.append(f"input size {recipe.input_size} px: {first}'s pretrained config")
    if recipe.data.normalize == "pretrained":
        notes.append(f"mean {list(ref['mean'])}, std {list(ref['std'])}: {first}'s pretrained config")
    for name, cfg in configs.items():
        differs = cfg["input_size"] != ref["input_size"] or (
            recipe.data.normalize == "pretrained" and (cfg["mean"], cfg["std"]) != (ref["mean"], ref["std"]))
        if name != first and differs:
            notes.append(f"{name} was pretrained at {cfg['input_size'][0]} px, mean {cfg['mean']}, std {cfg['std']}; "
                         f"the cohort shares one input: {recipe.input_size} px, normalised as {first} was")
    return notes


def starting_weights(recipe) -> dict[str, str]:
    """Where each network's starting weights come from, in words (for run.json and the console)."""
    return {name: (f"file {recipe.weights[name]}" if name in recipe.weights
                   else "timm pretrained (Hub)" if recipe.pretrained else "random")
            for name in recipe.models}


def check_weights(recipe) -> None:
    for name, file in recipe.weights.items():
        if name not in recipe.models:
            raise ClcliError(f"--weights names '{name}', which is not one of the models ({', '.join(recipe.models)})")
        if not Path(file).expanduser().is_file():
            raise ClcliError(f"weights file for '{name}' not found: {file}")


def read_plan(recipe, plan_path: str) -> tuple[object, list[str]]:
    """A `clcli probe --json` plan, and the recipe made to match it: the plan decides the models, the input size,
    the stem and the number of MKBs (the MKBs are built exactly as planned). Returns (plan, notes on what changed)."""
    from clcli import probe

    raw = files.read_json(plan_path, "plan file")
    try:
        plan = probe.Plan.from_dict(raw)
    except ClcliError as e:  # say which file the plan came from
        raise ClcliError(f"plan file {plan_path}: {e}") from None
    height, width = plan.input_size
    if height != width:
        raise ClcliError(f"{plan_path} plans a {height}x{width} input; recipes train on square inputs")
    changed = []
    for key, planned, current in (("models", plan.names, list(recipe.models)), ("input_size", height,
                                  recipe.input_size), ("stem", plan.stem, recipe.stem),
                                  ("cl.mkbs", len(plan.sites), recipe.cl.mkbs), ("cl.sites", [], recipe.cl.sites)):
        if planned != current:
            changed.append(f"{key} {current} -> {planned}")
    recipe.models, recipe.input_size, recipe.stem, recipe.cl.mkbs = plan.names, height, plan.stem, len(plan.sites)
    recipe.cl.sites = []  # the plan's sites are built as they are
    notes = [f"the plan {plan_path} decides: " + "; ".join(changed)] if changed else []
    return plan, notes


def plan_for(recipe, num_classes: int):
    from clcli import probe

    return probe.plan(list(recipe.models), recipe.input_size, stem=recipe.stem, mkbs=recipe.cl.mkbs,
                      num_classes=num_classes, embedding=recipe.cl.embedding, budget=recipe.cl.budget,
                      sites=recipe.cl.sites)
