"""A method part defined outside gradloc, as a researcher adds one (README, "Adding a
method"): an L2 pull towards the weights training started from,

    loss = LM loss + weight / 2 * sum ||theta - theta_0||^2   (the trained parameters).

A config switches it on with `parts: [tests/parts/l2_init.py]` and a method entry
`{l2_init: {weight: 1.0}}`; nothing in gradloc names it."""

from gradloc.parts import Part, register


def prepare(entry, prepared, job):
    """Remember where each trained parameter starts."""
    job.state["l2_init"] = [(p, p.detach().clone()) for g in prepared.groups for p in g["params"]]
    job.extra["l2_init"] = {"weight": entry["weight"], "tensors": len(job.state["l2_init"]), "steps": 0}


def loss(entry, model, batch, job):
    pull = sum(((p - p0.to(p.device)) ** 2).sum() for p, p0 in job.state["l2_init"])
    return entry["weight"] / 2 * pull


def after_step(entry, model, job):
    job.extra["l2_init"]["steps"] += 1  # recorded in metrics.json


PART = register(Part(
    "l2_init",
    schema={"type": "object", "additionalProperties": False, "description": "an L2 pull to the initial weights",
            "properties": {"weight": {"type": "number", "minimum": 0, "default": 1.0}}},
    prepare=prepare, loss=loss, after_step=after_step))
