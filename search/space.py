"""The Optuna search space: which sublayers the draft skips, which run over low-bit weights, where it exits,
which LM head it scores with, how a round drafts, and whether context drafts (copies of earlier text) take
rounds when the text repeats.

Low-bit forms are searched as one scheme for every kept sublayer from a layer on: below that layer the draft
stays exact, so the verify pass reuses its states; from it up the draft reads a fraction of the bytes.

Every trial draws the same parameters (a skip choice for every candidate sublayer even past the exit,
where it has no effect), so the space is fixed and multivariate TPE can model it jointly. A "layer draft"
that skips nothing and exits at the top would be the model itself at full cost: that point of the space
means no layer draft at all, so plain steps and context-only drafting are in the space too.
"""

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from selfspec.schedule import Schedule
from selfspec.schedule.presets import builtin_default, early_exit

VERSION = 3  # studies made over another space are not resumed with this one
MAX_WIDTH = 8  # widths past this need near-perfect agreement to pay
# A copy costs no draft step, so its width is bounded only by how the verify pass grows with width.
MAX_CONTEXT_WIDTH = 12
MAX_VERIFY_TOKENS = max(MAX_WIDTH, MAX_CONTEXT_WIDTH) + 1  # the verify widths the costs are measured at
CONTEXT_NGRAM = 4
ANNEAL = (0.0, 3.0)
CONFIDENCE = (0.0, 0.99)  # 0: a round stops only at its width or EOS


def skip_candidates(num_layers: int) -> range:
    """Layers whose sublayers the draft may skip.

    The first quarter is pinned: early layers build the token's contextual representation and skipping
    them wrecks agreement, and a skip there also shortens the exact prefix the verify pass reuses, so the
    verify pass redoes most of the model. The last layer is pinned too: it shapes the output distribution
    directly, and skipping it saves no more than any other layer would while costing the most agreement.
    """
    return range(max(1, num_layers // 4), num_layers - 1)


def distributions(
    num_layers: int, schemes: tuple[str, ...] = (), head_vocabs: tuple[int, ...] = (0,)
) -> dict[str, BaseDistribution]:
    """Exit layer (num_layers: no exit), a skip flag per candidate sublayer, the low-bit scheme and the layer it
    starts at, the draft head, then how a round drafts. `schemes` and `head_vocabs`: what was priced here."""
    space: dict[str, BaseDistribution] = {"exit": IntDistribution(num_layers // 2, num_layers)}
    for i in skip_candidates(num_layers):
        space[f"attn_{i}"] = CategoricalDistribution([False, True])
        space[f"mlp_{i}"] = CategoricalDistribution([False, True])
    space |= {
        "precision": CategoricalDistribution(["exact", *schemes]),
        "lowbit_from": IntDistribution(0, num_layers - 1),
        "head_precision": CategoricalDistribution(["exact", *schemes]),
        "head_vocab": CategoricalDistribution(list(head_vocabs)),
    }
    return space | {
        "width": IntDistribution(1, MAX_WIDTH),
        "anneal": FloatDistribution(*ANNEAL),
        "confidence": FloatDistribution(*CONFIDENCE),
        "adaptive_width": CategoricalDistribution([False, True]),
        "context_ngram": IntDistribution(0, CONTEXT_NGRAM),
        "context_min_ngram": IntDistribution(1, CONTEXT_NGRAM),
        "context_width": IntDistribution(2, MAX_CONTEXT_WIDTH),
    }


def schedule_of(params: dict, num_layers: int, frequent_tokens: tuple[int, ...] = ()) -> Schedule:
    """The schedule `params` describe; a cheap head lists the first of `frequent_tokens` (most frequent first)."""
    exit_layer = params["exit"]
    kept = [i for i in skip_candidates(num_layers) if i < exit_layer]
    skip_attn = tuple(i for i in kept if params[f"attn_{i}"])
    skip_mlp = tuple(i for i in kept if params[f"mlp_{i}"])
    scheme = params.get("precision", "exact")
    head_precision, head_vocab = params.get("head_precision", "exact"), params.get("head_vocab", 0)
    forms = {}
    if scheme != "exact":
        lowbit = range(params.get("lowbit_from", 0), exit_layer)
        forms[f"{scheme}_attn"] = tuple(i for i in lowbit if i not in skip_attn)
        forms[f"{scheme}_mlp"] = tuple(i for i in lowbit if i not in skip_mlp)
    lighter = head_precision != "exact" or head_vocab > 0 or any(forms.values())
    shallower = skip_attn or skip_mlp or exit_layer < num_layers or lighter
    ngram = params["context_ngram"]
    return Schedule(
        skip_attn=skip_attn,
        skip_mlp=skip_mlp,
        **forms,
        head_precision=head_precision,
        head_vocab=head_vocab,
        head_tokens=frequent_tokens[:head_vocab],
        exit_layer=None if exit_layer == num_layers else exit_layer,
        max_draft=params["width"] if shallower else 0,
        anneal=params["anneal"],
        confidence=params["confidence"],
        adaptive_width=params["adaptive_width"],
        context_ngram=ngram,
        context_min_ngram=min(params["context_min_ngram"], max(1, ngram)),
        context_max_draft=params["context_width"],
    )


def params_for(schedule: Schedule, num_layers: int) -> dict:
    """The parameters that `schedule_of` turns into `schedule` (skips outside the candidates dropped)."""
    params = {
        "exit": schedule.exit_layer or num_layers,
        "width": max(1, schedule.max_draft),
        "anneal": schedule.anneal,
        "confidence": schedule.confidence,
        "adaptive_width": schedule.adaptive_width,
        "context_ngram": schedule.context_ngram,
        "context_min_ngram": schedule.context_min_ngram,
        "context_width": schedule.context_max_draft,
        "precision": (schedule.body_schemes or ("exact",))[0],
        "lowbit_from": min(schedule.lowbit_layers, default=0),
        "head_precision": schedule.head_precision,
        "head_vocab": schedule.head_vocab,
    }
    for i in skip_candidates(num_layers):
        params[f"attn_{i}"] = i in schedule.skip_attn
        params[f"mlp_{i}"] = i in schedule.skip_mlp
    return params


def seeds(num_layers: int, schemes: tuple[str, ...] = (), head_vocabs: tuple[int, ...] = (0,)) -> list[Schedule]:
    """Hand-picked first trials, so the sampler's first model of the space is not built from random skip
    sets alone (skipping half of all sublayers agrees with the full model almost nowhere).

    They follow what tends to pay: the whole model over low-bit weights with a small head (QuantSpec's
    self-draft), alone and beside context copies, and the whole model over low-bit weights drafting wide with no
    floor (where it agrees almost always); a few attention sublayers skipped in the late-middle
    layers, or an exit a little before the top, with a high confidence floor and a small width; context
    copies alone, and beside a layer draft; plus the fixed early-exit recipe. The built-in default comes first:
    tune times it beside its finalists (`tune.contenders`), so what it records never loses to what runs without it.
    """
    late = tuple(round(num_layers * f) for f in (0.6, 0.7, 0.8))
    copies = {"context_ngram": 3, "context_min_ngram": 1, "context_max_draft": 8}
    every = tuple(range(num_layers))
    small = min((v for v in head_vocabs if v), default=0)

    def whole(scheme: str, **rounds) -> Schedule:
        return Schedule(**{f"{scheme}_attn": every, f"{scheme}_mlp": every}, head_precision=scheme, **rounds)

    narrow = {"max_draft": 3, "anneal": 1.0, "confidence": 0.5}
    lowbit = [whole(s, head_vocab=v, **narrow, **extra) for s in schemes for v, extra in ((small, {}), (small, copies))]
    # near-perfect agreement: a wide round that fills the 8-token verify bucket, no floor
    lowbit += [whole(s, max_draft=7, anneal=1.0) for s in schemes]
    return (
        [builtin_default(num_layers)]
        + lowbit
        + [
            Schedule(max_draft=0, anneal=1.0, confidence=0.9, **copies),  # no layer draft: its settings are inert
            Schedule(skip_attn=late, max_draft=2, anneal=1.0, confidence=0.9, **copies),
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
            early_exit(num_layers),
        ]
    )
