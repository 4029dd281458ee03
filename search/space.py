"""The Optuna search space: which sublayers the draft skips, where it exits, and how a round drafts.

Every trial draws the same parameters (a skip choice for every candidate sublayer even past the exit,
where it has no effect), so the space is fixed and multivariate TPE can model it jointly.
"""

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from selfspec.schedule import Schedule
from selfspec.wrap import default_schedule

MAX_WIDTH = 8  # widths past this need near-perfect agreement to pay, and the costs measure verify up to it + 1
ANNEAL = (0.0, 3.0)
CONFIDENCE = (0.2, 0.99)


def skip_candidates(num_layers: int) -> range:
    """Layers whose sublayers the draft may skip.

    The first quarter is pinned: early layers build the token's contextual representation and skipping
    them wrecks agreement, and a skip there also shortens the exact prefix the verify pass reuses, so the
    verify pass redoes most of the model. The last layer is pinned too: it shapes the output distribution
    directly, and skipping it saves no more than any other layer would while costing the most agreement.
    """
    return range(max(1, num_layers // 4), num_layers - 1)


def distributions(num_layers: int) -> dict[str, BaseDistribution]:
    """Exit layer (num_layers: no exit), a skip flag per candidate sublayer, then how a round drafts."""
    space: dict[str, BaseDistribution] = {"exit": IntDistribution(num_layers // 2, num_layers)}
    for i in skip_candidates(num_layers):
        space[f"attn_{i}"] = CategoricalDistribution([False, True])
        space[f"mlp_{i}"] = CategoricalDistribution([False, True])
    return space | {
        "width": IntDistribution(1, MAX_WIDTH),
        "anneal": FloatDistribution(*ANNEAL),
        "confidence": FloatDistribution(*CONFIDENCE),
        "adaptive_width": CategoricalDistribution([False, True]),
    }


def schedule_of(params: dict, num_layers: int) -> Schedule:
    exit_layer = params["exit"]
    kept = [i for i in skip_candidates(num_layers) if i < exit_layer]
    return Schedule(
        skip_attn=tuple(i for i in kept if params[f"attn_{i}"]),
        skip_mlp=tuple(i for i in kept if params[f"mlp_{i}"]),
        exit_layer=None if exit_layer == num_layers else exit_layer,
        max_draft=params["width"],
        anneal=params["anneal"],
        confidence=params["confidence"],
        adaptive_width=params["adaptive_width"],
    )


def params_for(schedule: Schedule, num_layers: int) -> dict:
    """The parameters that `schedule_of` turns into `schedule` (skips outside the candidates dropped)."""
    params = {
        "exit": schedule.exit_layer or num_layers,
        "width": schedule.max_draft,
        "anneal": schedule.anneal,
        "confidence": schedule.confidence,
        "adaptive_width": schedule.adaptive_width,
    }
    for i in skip_candidates(num_layers):
        params[f"attn_{i}"] = i in schedule.skip_attn
        params[f"mlp_{i}"] = i in schedule.skip_mlp
    return params


def seeds(num_layers: int) -> list[Schedule]:
    """Hand-picked first trials, so the sampler's first model of the space is not built from random skip
    sets alone (skipping half of all sublayers agrees with the full model almost nowhere).

    They follow what tends to pay: a few attention sublayers skipped in the late-middle layers, or an exit
    a little before the top, with a high confidence floor and a small width; plus the untuned default.
    """
    late = tuple(round(num_layers * f) for f in (0.6, 0.7, 0.8))
    return [
        Schedule(skip_attn=late, max_draft=2, anneal=1.0, confidence=0.9),
        Schedule(skip_attn=late[-1:], max_draft=1, anneal=1.0, confidence=0.95),
        Schedule(skip_mlp=late[1:], max_draft=3, anneal=1.0, confidence=0.9),
        Schedule(exit_layer=num_layers - 2, max_draft=3, anneal=1.0, confidence=0.8),
        Schedule(
            skip_attn=late,
            skip_mlp=late[-1:],
            exit_layer=num_layers - 1,
            max_draft=4,
            anneal=1.0,
            confidence=0.9,
            adaptive_width=True,
        ),
        default_schedule(num_layers),
    ]
