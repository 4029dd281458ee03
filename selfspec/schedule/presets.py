"""Named schedules: drafting off, the built-in default, and the fixed layer-exit recipe tune starts from.

`--schedule NAME` on the command line takes any of them; a path takes a schedule file.
"""

from collections.abc import Callable

from .spec import Schedule


def plain(num_layers: int) -> Schedule:
    """Drafting off: the plain loop."""
    return Schedule.plain()


def builtin_default(num_layers: int) -> Schedule:
    """What `wrap(model)` runs where `selfspec tune` has recorded nothing for this model and machine: context copies
    of up to 3 tokens after a recurring 2- or 3-gram, plain steps otherwise.

    A copy runs no layer, so it costs only a verify pass 4 tokens wide, which the few-row kernel streams for about
    one step; a round takes a copy only while copies have lately emitted tokens at least as fast as plain steps
    (`drafting.SourceChooser`), so text that never repeats runs at the plain loop's speed. Measured against the plain
    loop (README, "Without a schedule"), it was at least even on every zoo model and CPU tried; a layer draft is
    not: a fixed one agrees too seldom on small models, and low-bit drafts pay or not by CPU. Wider copies cost
    more a pass (a width-8 pass, 1.2 to 1.8 steps by CPU and kernel) and measured no better.
    """
    return Schedule(max_draft=0, context_ngram=3, context_min_ngram=2, context_max_draft=3)


def early_exit(num_layers: int) -> Schedule:
    """Exit at ~3/4 depth, annealed, stopping at the first unsure token: one of tune's first trials.

    Small models agree poorly with their shallow layers, so the floor keeps wasted drafts short. Never a default:
    on the zoo's models it measured well under the plain loop (alpha ~0.2).
    """
    return Schedule(exit_layer=max(1, round(0.75 * num_layers)), max_draft=6, anneal=1.0, confidence=0.6)


NAMED: dict[str, Callable[[int], Schedule]] = {"plain": plain, "default": builtin_default, "early-exit": early_exit}
