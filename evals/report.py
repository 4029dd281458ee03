"""What an evaluation found: per-prompt records, metrics per method and category, report.json, the
terminal table, the plot, and two reports side by side.

Everything after the run works from the JSON-shaped records alone, so a saved report can be re-read,
re-summarised and compared without the model.
"""

import json
import platform
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from statistics import median
from typing import Any

import torch
import transformers
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from selfspec.search.surrogate import leviathan_bound
from transformers import PreTrainedModel

import selfspec
from selfspec import GenerationStats, Schedule, SelfspecError
from selfspec.cpu import cpu_flags, cpu_name, kernel_setting
from selfspec.decode.loop import TOTALS
from selfspec.files import write_json_atomic
from selfspec.schedule import describe

from .prompts import ALL
from .runner import REFERENCE, Method, PromptRun, Settings

FORMAT = "selfspec.eval/1"
ENGINE_FIELDS = TOTALS
ENGINE_METRICS = (
    "mean_accepted_length",
    "acceptance_rate",
    "rounds",
    "drafted",
    "accepted",
    "stop_reasons",
    "accepted_lengths",
    "rounds_by_source",
    "drafted_by_source",
    "accepted_by_source",
)
MAX_LISTED = 10  # differing prompts named in the terminal; report.json has them all
# fixed per method, so that plots of runs with different baselines read alike
COLORS = {"generate": "tab:blue", "plain": "tab:orange", "prompt_lookup": "tab:green", "selfspec": "tab:red"}


def first_difference(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first new token where `tokens` departs from `reference`; None when identical."""
    for index, (got, want) in enumerate(zip(tokens, reference)):
        if got != want:
            return index
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def prompt_record(run: PromptRun) -> dict[str, Any]:
    """One prompt's figures for every method, checked token by token against the reference."""
    reference = run.runs[REFERENCE].tokens
    methods = {}
    for name, result in run.runs.items():
        diff = first_difference(result.tokens, reference)
        methods[name] = {
            "new_tokens": len(result.tokens),
            "tokens_per_second": round(result.tokens_per_second, 3),
            "rates": [round(rate, 3) for rate in result.rates],
            "identical": diff is None,
            "first_diff": diff,
            "stats": result.stats,
        }
    prompt = run.prompt
    return {
        "question_id": prompt.question_id,
        "category": prompt.category,
        "prompt_tokens": run.prompt_tokens,
        "methods": methods,
    }


def summarize(records: Sequence[dict[str, Any]], gamma: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """group ("all", then each category) -> method -> metrics; `gamma`: selfspec's layer-draft width bound, for
    the layer draft's figures against the plain loop."""
    if not records:
        return {}
    groups = {ALL: list(records)}
    for record in records:
        groups.setdefault(record["category"], []).append(record)
    methods = list(records[0]["methods"])
    summary = {group: {m: _metrics(rows, m) for m in methods} for group, rows in groups.items()}
    if gamma and {"plain", "selfspec"} <= set(methods):
        for group, rows in groups.items():
            totals = [total_stats([r["methods"][m]["stats"] for r in rows]) for m in ("selfspec", "plain")]
            summary[group]["selfspec"] |= layer_draft_figures(*totals, gamma)
    return summary


def layer_draft_figures(draft: GenerationStats, plain: GenerationStats, gamma: int) -> dict[str, float]:
    """The layer draft as measured live: alpha (the share of its checked tokens kept), c (one draft forward over one plain
    step), Leviathan's bound for them with `gamma` drafts a round, and the decode speedup to hold against it (both
    methods' tokens over their time after the prompt pass, which the bound knows nothing of); {} without layer
    drafts."""
    if not draft.layer_draft_steps or not plain.new_tokens:
        return {}
    plain_step = plain.decode_seconds_per_token
    alpha, c = draft.layer_alpha, draft.layer_draft_step_seconds / plain_step
    return {
        "layer_alpha": round(alpha, 3),
        "layer_c": round(c, 3),
        "layer_bound": round(leviathan_bound(alpha, gamma, c), 3),
        "decode_speedup": round(plain_step / draft.decode_seconds_per_token, 3),
    }


def total_stats(stats: Sequence[dict[str, Any]]) -> GenerationStats:
    """Engine statistics (as written in a report) summed over prompts."""
    total = GenerationStats()
    for s in stats:
        total.merge(_stats_from_dict(s))
    return total


def _metrics(records: Sequence[dict[str, Any]], method: str) -> dict[str, Any]:
    runs = [r["methods"][method] for r in records]
    identical = sum(run["identical"] for run in runs)
    return {
        "prompts": len(runs),
        "new_tokens": sum(run["new_tokens"] for run in runs),
        "tokens_per_second": round(median(run["tokens_per_second"] for run in runs), 3),
        "speedup_vs_generate": _median_ratio(records, method, "generate"),
        "speedup_vs_plain": _median_ratio(records, method, "plain"),
        "identical": identical,
        "agreement": round(identical / len(runs), 4),
        **_engine_metrics([run["stats"] for run in runs]),
    }


def _median_ratio(records: Sequence[dict[str, Any]], method: str, base: str) -> float | None:
    # the median of per-prompt ratios: the runs of one prompt are interleaved, so they share the drift
    if base not in records[0]["methods"]:
        return None
    ratios = [r["methods"][method]["tokens_per_second"] / r["methods"][base]["tokens_per_second"] for r in records]
    return round(median(ratios), 3)


def _engine_metrics(stats: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Draft statistics summed over prompts; None for methods the engine did not run."""
    if any(s is None for s in stats):
        return dict.fromkeys(ENGINE_METRICS)
    total = total_stats(stats)
    return {
        "mean_accepted_length": round(total.mean_accepted_length, 3),
        "acceptance_rate": round(total.acceptance_rate, 3),
        "rounds": total.rounds,
        "drafted": total.drafted,
        "accepted": total.accepted,
        "stop_reasons": dict(total.stop_reasons.most_common()),
        "accepted_lengths": {str(k): v for k, v in sorted(total.accepted_lengths.items())},
        "rounds_by_source": dict(total.rounds_by_source.most_common()),
        "drafted_by_source": dict(total.drafted_by_source.most_common()),
        "accepted_by_source": dict(total.accepted_by_source.most_common()),
    }


def _stats_from_dict(s: dict[str, Any]) -> GenerationStats:
    # merging real GenerationStats keeps the engine's own definitions of the derived rates
    lengths = Counter({int(k): v for k, v in s["accepted_lengths"].items()})
    counts = {k: s.get(k, 0) for k in ENGINE_FIELDS}  # reports before layer-draft timing lack the last three
    by_source = {k: Counter(s.get(k, {})) for k in ("rounds_by_source", "drafted_by_source", "accepted_by_source")}
    return GenerationStats(**counts, stop_reasons=Counter(s["stop_reasons"]), accepted_lengths=lengths, **by_source)


def environment(model: PreTrainedModel) -> dict[str, Any]:
    device = model.device
    return {
        "selfspec": selfspec.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_flags": cpu_flags(),
        "kernels": kernel_setting(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def run_meta(
    name: str, model: PreTrainedModel, methods: Sequence[Method], settings: Settings, **inputs: Any
) -> dict[str, Any]:
    """What a report records about its run: `inputs` (prompt source, filters) and the settings,
    environment and selfspec schedule. `name` is how the model was asked for."""
    fast = next(m.engine for m in methods if m.name == "selfspec")
    return {
        "model": name,
        **inputs,
        "max_new_tokens": settings.max_new_tokens,
        "repeats": settings.repeats,
        "do_sample": settings.do_sample,
        "seed": settings.seed if settings.do_sample else None,
        "methods": [m.name for m in methods],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(model),
        "schedule": fast.schedule.to_dict(),
        "schedule_source": fast.schedule_source,
    }


def build_report(records: Sequence[dict[str, Any]], meta: dict[str, Any], partial: bool = False) -> dict[str, Any]:
    """The whole report; `meta` comes from run_meta."""
    summary = summarize(records, meta["schedule"]["max_draft"])
    return {"format": FORMAT, "partial": partial, **meta, "summary": summary, "records": list(records)}


def save(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.json, and report.png when there is anything to plot; return the paths written."""
    paths = [out_dir / "report.json"]
    write_json_atomic(paths[0], report)
    if report["records"]:
        paths.append(out_dir / "report.png")
        plot(report, paths[1])
    return paths


def load_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SelfspecError(f"cannot read report {path}: {e}") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT or not isinstance(report.get("summary"), dict):
        raise SelfspecError(f"{path} is not a selfspec eval report ({FORMAT})")
    return report


# --- plot -----------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> None:
    """Tokens/s per method per category (grouped bars) and selfspec's accepted-length histogram."""
    summary = report["summary"]
    # a bare Figure renders with Agg and leaves pyplot's global backend alone (notebooks, servers)
    bars_width = max(5.5, 0.8 * len(summary))  # inches; the histogram keeps a fixed 3.5
    fig = Figure(figsize=(bars_width + 3.5, 4.8), layout="constrained")
    bars, hist = fig.subplots(1, 2, width_ratios=(bars_width, 3.5))
    _speed_bars(bars, summary)
    _length_histogram(hist, summary[ALL]["selfspec"])
    env = report["environment"]
    partial = " (partial)" if report["partial"] else ""
    fig.suptitle(
        f"{report['model']} · {env['dtype']} · {env['device']} · {report['max_new_tokens']} new tokens{partial}"
    )
    # constrained layout leaves titles wider than their axes to overflow; "tight" keeps them in the image
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _speed_bars(ax: Any, summary: dict[str, dict[str, dict[str, Any]]]) -> None:
    groups, methods = list(summary), list(summary[ALL])
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        offset = (i - (len(methods) - 1) / 2) * width
        xs = [g + offset for g in range(len(groups))]
        speeds = [summary[g][method]["tokens_per_second"] for g in groups]
        ax.bar(xs, speeds, width, label=method, color=COLORS[method])
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("new tokens / s (median over prompts)")
    ax.set_title("speed by category")
    ax.margins(y=0.15)  # headroom for the legend
    ax.legend(ncols=len(methods), loc="upper left", fontsize="small")
    ax.grid(axis="y", alpha=0.3)


def _length_histogram(ax: Any, metrics: dict[str, Any]) -> None:
    lengths = {int(k): v for k, v in metrics["accepted_lengths"].items()}
    rounds = sum(lengths.values())
    ax.bar(list(lengths), [count / rounds for count in lengths.values()], color=COLORS["selfspec"])
    ax.set_xticks(range(1, max(lengths) + 1))
    ax.set_xlabel("tokens per verify pass")
    ax.set_ylabel("share of rounds")
    ax.set_title(f"selfspec accepted length\nmean {metrics['mean_accepted_length']:.2f}, {rounds} rounds")
    ax.grid(axis="y", alpha=0.3)


# --- terminal -------------------------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _lossless(metrics: dict[str, Any] | None) -> str:
    if metrics is None:
        return "-"
    n, same = metrics["prompts"], metrics["identical"]
    if same == n:
        return f"[green]{same}/{n}[/green]"
    return f"[red]{same}/{n} ({metrics['agreement']:.0%})[/red]"


def print_report(report: dict[str, Any], console: Console) -> None:
    """The summary table, rounds by stop reason, and every prompt whose tokens differ from generate."""
    summary = report["summary"]
    if not summary:
        console.print("no prompt finished: nothing to report")
        return
    note = " · sampled: identical tokens are not expected" if report["do_sample"] else ""
    partial = " · [yellow]partial[/yellow]" if report["partial"] else ""
    table = Table(title=f"selfspec eval · {report['model']} · {report['environment']['dtype']}{note}{partial}")
    for column in ("category", "method", "n", "tok/s", "× generate", "× plain", "acc. len", "acc. rate", "lossless"):
        table.add_column(column, justify="left" if column in ("category", "method") else "right")
    for group, methods in summary.items():
        for method, m in methods.items():
            table.add_row(
                group, method, str(m["prompts"]), _num(m["tokens_per_second"], ".1f"),
                _num(m["speedup_vs_generate"], ".2f"), _num(m["speedup_vs_plain"], ".2f"),
                _num(m["mean_accepted_length"], ".2f"), _num(m["acceptance_rate"], ".0%"), _lossless(m),
            )  # fmt: skip
        table.add_section()
    console.print(table)
    if "schedule_source" in report:  # reports before it did not record it
        console.print(
            f"selfspec schedule: {describe(Schedule.from_dict(report['schedule']))}, {report['schedule_source']}"
        )
    for method, m in summary[ALL].items():
        if m["stop_reasons"]:
            reasons = " · ".join(f"{reason} {count}" for reason, count in m["stop_reasons"].items())
            console.print(f"{method} rounds by stop reason: {reasons}")
        if m["rounds_by_source"]:
            sources = " · ".join(
                f"{source} {rounds} rounds, {m['accepted_by_source'].get(source, 0)}/"
                f"{m['drafted_by_source'].get(source, 0)} drafted tokens kept"
                for source, rounds in m["rounds_by_source"].items()
            )
            console.print(f"{method} by draft source: {sources}")
        if m.get("layer_alpha") is not None:
            console.print(
                f"{method} layer draft, measured: alpha {m['layer_alpha']:.2f} (drafted tokens kept), c {m['layer_c']:.2f} "
                f"(draft forward / plain step), Leviathan bound {m['layer_bound']:.3f} "
                f"(gamma {report['schedule']['max_draft']}); decoding × plain {m['decode_speedup']:.3f} (prompt passes "
                f"excluded) = {m['decode_speedup'] / m['layer_bound']:.0%} of the bound"
            )
    differing = [
        f"[red]{method}[/red] differs from generate on {record['question_id']} ({record['category']}) "
        f"from new token {run['first_diff']}"
        for record in report["records"]
        for method, run in record["methods"].items()
        if not run["identical"]
    ]
    for line in differing[:MAX_LISTED]:
        console.print(line)
    if len(differing) > MAX_LISTED:
        console.print(f"… and {len(differing) - MAX_LISTED} more: see first_diff in report.json")


def print_comparison(a: dict[str, Any], b: dict[str, Any], names: Sequence[str], console: Console) -> None:
    """Two reports side by side, matched by category and method; B/A is the tokens/s ratio."""
    for label, name, report in (("A", names[0], a), ("B", names[1], b)):
        env = report["environment"]
        partial = " [yellow]partial[/yellow]" if report["partial"] else ""
        console.print(
            f"[bold]{label}[/bold] {name}: {report['model']} · {env['dtype']} · {env['device']} · "
            f"{env['torch_threads']} threads · {report['max_new_tokens']} new tokens{partial}"
        )
    table = Table(title="selfspec eval comparison")
    columns = (
        "category",
        "method",
        "tok/s A",
        "tok/s B",
        "B/A",
        "× gen A",
        "× gen B",
        "acc. len A",
        "acc. len B",
        "lossless A",
        "lossless B",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("category", "method") else "right")
    groups = list(dict.fromkeys([*a["summary"], *b["summary"]]))
    for group in groups:
        ga, gb = a["summary"].get(group, {}), b["summary"].get(group, {})
        for method in dict.fromkeys([*ga, *gb]):
            table.add_row(group, method, *_compared(ga.get(method), gb.get(method)))
        table.add_section()
    console.print(table)


def _compared(ma: dict[str, Any] | None, mb: dict[str, Any] | None) -> list[str]:
    def get(m: dict[str, Any] | None, key: str) -> Any:
        return None if m is None else m[key]

    ratio = None
    if ma is not None and mb is not None and ma["tokens_per_second"]:
        ratio = mb["tokens_per_second"] / ma["tokens_per_second"]
    return [
        _num(get(ma, "tokens_per_second"), ".1f"), _num(get(mb, "tokens_per_second"), ".1f"), _num(ratio, ".2f"),
        _num(get(ma, "speedup_vs_generate"), ".2f"), _num(get(mb, "speedup_vs_generate"), ".2f"),
        _num(get(ma, "mean_accepted_length"), ".2f"), _num(get(mb, "mean_accepted_length"), ".2f"),
        _lossless(ma), _lossless(mb),
    ]  # fmt: skip
