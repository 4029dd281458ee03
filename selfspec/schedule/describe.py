"""A schedule in one short line, as tune's table, the CLI's stderr notes and reports show it."""

from .spec import Schedule


def _layers(indices: tuple[int, ...]) -> str:
    """(7, 8, 9, 12) -> '7-9,12'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def describe(schedule: Schedule) -> str:
    """One short line: context copies, then skipped sublayers, exit, width, confidence floor, anneal."""
    if not schedule.drafting:
        return "plain loop (drafting off)"
    parts = []
    if schedule.context_ngram:
        parts.append(f"ctx n{schedule.context_min_ngram}-{schedule.context_ngram} w{schedule.context_max_draft}")
    if schedule.max_draft == 0:
        return " ".join(parts + ["+ plain"])
    forms = [("attn", "skip_attn"), ("mlp", "skip_mlp")]
    forms += [(f"{s} {kind}", f"{s}_{kind}") for s in ("int8", "int4") for kind in ("attn", "mlp")]
    parts += [f"{label} {_layers(getattr(schedule, name))}" for label, name in forms if getattr(schedule, name)]
    if schedule.head_precision != "exact" or schedule.head_vocab:
        parts.append(f"head {schedule.head_precision} {schedule.head_vocab or 'all'}")
    if schedule.exit_layer is not None:
        parts.append(f"exit {schedule.exit_layer}")
    parts.append(f"w{schedule.max_draft}{'+' if schedule.adaptive_width else ''}")
    parts.append(f"p>={schedule.confidence:.2f} a={schedule.anneal:.1f}")
    return " ".join(parts)
