"""The tuning study: the surrogate ranks schedules in an Optuna study, then the best few are timed for real.

A study lives in Optuna storage (an SQLite file by default), so an interrupted tune keeps every finished
trial, a rerun resumes it, and several workers can share one study. What the surrogate scores against (the
calibration continuations and the measured costs) is stored in the study when it is created, so every
trial of a study, whichever run or worker made it, is predicted on the same footing.
"""

import hashlib
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import optuna
import sqlalchemy
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfspec.decode.loop import GenerationStats
from selfspec.drafts.lowbit import draft_weights
from selfspec.engine.fused import engine_adapter
from selfspec.errors import SelfspecError
from selfspec.fingerprint import model_identity
from selfspec.schedule import Schedule, record
from selfspec.schedule.presets import builtin_default
from selfspec.wrap import wrap

from . import space
from .costs import Costs, measure_costs
from .prompts import Prompt
from .surrogate import Text, predict, prepare
from .teacher import Continuation, encode_prompt, frequent_tokens, greedy_continuations

OBJECTIVES = ("speed", "speed+acceptance")
# Measured speedups this close to 1 are within run-to-run noise; drafting must clearly pay to be chosen.
MIN_SPEEDUP = 1.02
MIN_ACCEPTED_LENGTH = 1.05  # predicted tokens per verify pass for a finalist
# A sampled schedule predicted on the first calibration texts below this share of the best early figure so far
# is pruned there. Every schedule is scored on the same texts in the same order, so early figures compare like
# with like; a third of the texts already separates the bulk of the space (agreement 0.3-0.7) from the best.
PRUNE_SHARE = 0.8
# A running trial's worker writes a heartbeat this often; a trial whose heartbeat is older than the grace
# period belongs to a worker that died (killed, machine lost), and the next worker to start a trial marks it
# FAIL instead of leaving it RUNNING forever. Three beats of grace: a busy machine may delay one.
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 3 * HEARTBEAT_SECONDS
STORAGE_ATTEMPTS = 5  # workers that start together on a new database race to create its tables
# Which machine and process made a trial: shown in the study (optuna-dashboard) when workers share it.
WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class TuneConfig:
    out: Path
    storage: str
    study: str
    trials: int = 300  # added by this run
    timeout: float | None = 240.0  # seconds for this run's search; finished trials are kept either way
    objective: str = "speed"
    seed: int = 0
    finalists: int = 3  # 0: search only, as a worker does (a later run with --trials 0 measures)
    calibration_tokens: int = 48  # greedy continuation per calibration prompt, made once per study
    measure_tokens: int = 64  # per held-out prompt and schedule in the timed comparison
    measure_seconds: float = 150.0  # no new held-out prompt is started past this; one always runs
    cost_repeats: int = 9


@dataclass
class Measurement:
    """One schedule timed on the held-out prompts; trial is None for the plain loop."""

    schedule: Schedule
    trial: optuna.trial.FrozenTrial | None
    stats: GenerationStats = field(default_factory=GenerationStats)
    differing_outputs: int = 0  # prompts whose output differed from the plain loop's (should stay 0)

    @property
    def prediction(self) -> dict:
        return self.trial.user_attrs["prediction"] if self.trial else {}


@dataclass
class TuneResult:
    schedule: Schedule  # what was written
    plain: Measurement | None
    finalists: list[Measurement]
    chosen: Measurement | None  # None: drafting off (nothing beat plain, or nothing was measured)
    trials: int  # finished trials in the study
    pruned: int  # trials of the study pruned on their early figure
    recorded: Path | None = None  # where it was kept for this model and machine (`selfspec.schedule.recorded`)


class Reporter:
    """What a tune tells as it goes; this base tells nothing (the CLI draws progress bars)."""

    def stage(self, text: str) -> None:
        """A setup step starts."""

    def search(self, trials: int, timeout: float | None) -> None:
        """The search starts: this run adds up to `trials` trials within `timeout` seconds."""

    def trial(self, done: int, best_predicted: float | None) -> None:
        """A trial of this run finished; best_predicted is over the whole study."""

    def measure(self, runs: int, seconds: float) -> None:
        """The timed comparison starts: at most `runs` generations, new prompts started for `seconds`."""

    def measured(self, done: int, best_speedup: float | None) -> None:
        """A timed generation finished; best_speedup is the best finalist's measured speedup so far."""


def default_storage(out: Path) -> str:
    return f"sqlite:///{out.with_suffix('.db')}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage at `url`, with trial heartbeats; a bad URL, a missing driver or a server that
    cannot be reached is a SelfspecError.

    Workers that start together on a new database race to create its tables and all but one fail: those try
    again, when the winner's tables are there.
    """
    # Workers sharing one SQLite file wait for each other's writes instead of failing after SQLite's 5 s.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for _ in range(STORAGE_ATTEMPTS):
        try:
            with _quiet_experimental():
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS
                )
        except ImportError as e:
            raise SelfspecError(_missing_driver(url, e)) from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
            error = e
            if not _lost_table_race(e):
                break
            time.sleep(1.0)
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    raise SelfspecError(f"cannot open --storage {_hide_password(url)}: {reason}") from None


def _lost_table_race(error: Exception) -> bool:
    """Whether `error` says another worker created the same tables first. PostgreSQL says it in two ways,
    depending on how far the other's CREATE TABLE got: a duplicate table (42P07) or a duplicate row of its
    catalogue (23505, an IntegrityError); SQLite says the table already exists."""
    if isinstance(error, (sqlalchemy.exc.IntegrityError, optuna.exceptions.StorageInternalError)):
        return True
    original = getattr(error, "orig", None)
    return getattr(original, "pgcode", None) in ("42P07", "42710") or "already exists" in str(original or "")


@contextmanager
def _quiet_experimental() -> Iterator[None]:
    """Optuna calls heartbeats experimental and warns so on every run; the warning says nothing more."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _hide_password(url: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def _missing_driver(url: str, error: ImportError) -> str:
    driver = sqlalchemy.engine.make_url(url).drivername
    if driver in ("postgresql", "postgresql+psycopg2"):
        return "the PostgreSQL driver is missing; pip install 'selfspec[postgres]'"
    return f"the database driver of {driver!r} is missing ({error.__cause__ or error}); install it"


def open_study(config: TuneConfig) -> optuna.Study:
    directions = ["maximize"] if config.objective == "speed" else ["maximize", "maximize"]
    storage = open_storage(config.storage)
    study = optuna.create_study(storage=storage, study_name=config.study, directions=directions, load_if_exists=True)
    if len(study.directions) != len(directions):
        raise SelfspecError(f"study {config.study!r} was made for another --objective; choose another --study")
    with _quiet_experimental():  # study.optimize does this before each trial; a run that only measures too
        optuna.storages.fail_stale_trials(study)
    # Offset by the trials already there, so a resumed run does not replay the first run's random draws.
    study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials))
    return study


def _setup_key(model: PreTrainedModel, name: str, prompts: list[Prompt]) -> dict:
    digest = hashlib.sha256("\0".join(p.text for p in prompts).encode()).hexdigest()[:16]
    return {
        "model": model_identity(model, name),
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": model.device.type,
        "prompts_digest": digest,
        "space": space.VERSION,
    }


def _claim(study: optuna.Study, key: str, value) -> object:
    """Store `value` under `key` unless a worker got there first; return what the study holds."""
    if key not in study.user_attrs:
        study.set_user_attr(key, value)
    return study.user_attrs[key]


def calibrate(
    study: optuna.Study,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    prompts: list[Prompt],
    config: TuneConfig,
    reporter: Reporter,
) -> tuple[list[Text], Costs, tuple[int, ...]]:
    """The study's calibration texts, costs and the model's most frequent tokens: made and stored on first use,
    loaded after."""
    key = _setup_key(model, name, prompts)
    held = _claim(study, "setup", key)
    if held != key:
        raise SelfspecError(
            f"study {study.study_name!r} was tuned for another model, dtype, device or prompt set "
            f"({held}); choose another --study or --storage"
        )
    if "calibration" not in study.user_attrs:
        reporter.stage(f"greedy continuations of {len(prompts)} calibration prompts")
        made = greedy_continuations(model, tokenizer, [p.text for p in prompts], config.calibration_tokens)
        _claim(study, "calibration", [[c.tokens.tolist(), c.prompt_length] for c in made])
    continuations = [Continuation(torch.tensor(t), n) for t, n in study.user_attrs["calibration"]]
    if "costs" not in study.user_attrs:
        reporter.stage("timing the model's parts on this device")
        costs = measure_costs(model, max_tokens=space.MAX_VERIFY_TOKENS, repeats=config.cost_repeats)
        _claim(study, "costs", costs.to_dict())
    reporter.stage("teacher-forced passes over the calibration texts")
    return prepare(model, continuations), Costs.from_dict(study.user_attrs["costs"]), frequent_tokens(continuations)


def _evaluate(
    model: PreTrainedModel,
    texts: list[Text],
    costs: Costs,
    frequent: tuple[int, ...],
    objective: str,
    params: dict,
    prune_below: float | None = None,
) -> tuple:
    """(objective values, trial attributes) of the schedule that `params` describe."""
    schedule = space.schedule_of(params, costs.num_layers, frequent)
    prediction = predict(model, texts, costs, schedule, prune_below)
    values = [prediction.speedup] + ([prediction.accepted_length] if objective == "speed+acceptance" else [])
    return values, {"schedule": schedule.to_dict(), "prediction": prediction.to_dict()}


def search(
    study: optuna.Study,
    model: PreTrainedModel,
    texts: list[Text],
    costs: Costs,
    frequent: tuple[int, ...],
    config: TuneConfig,
    reporter: Reporter,
) -> None:
    """Add up to config.trials trials within config.timeout: first the hand-picked seeds the study lacks,
    then the sampler's.

    Seeds are added as finished trials rather than enqueued: workers popping one queue of waiting trials
    can both take the same one on SQLite, which has no row locks. Workers that start together on a new
    study may each add the seeds, which costs a few duplicate trials and nothing else.
    """
    evaluate = partial(_evaluate, model, texts, costs, frequent, config.objective)
    offered = costs.num_layers, costs.schemes, costs.head_vocabs
    distributions = space.distributions(*offered)
    known = [t.params for t in study.trials]
    seeds = [space.params_for(s, costs.num_layers) for s in space.seeds(*offered)]
    seeds = [p for p in seeds if p not in known]
    reporter.search(config.trials, config.timeout)
    started = time.perf_counter()
    for done in range(1, config.trials + 1):
        if config.timeout is not None and time.perf_counter() - started > config.timeout:
            return
        if seeds:
            _add(study, distributions, seeds.pop(0), evaluate)
        else:
            _sample(study, distributions, evaluate, len(texts), config.objective == "speed")
        reporter.trial(done, best_predicted(study))


def _add(study: optuna.Study, distributions: dict, params: dict, evaluate: Callable) -> None:
    values, attrs = evaluate(params)
    attrs["worker"] = WORKER
    trial = optuna.trial.create_trial(params=params, distributions=distributions, values=values, user_attrs=attrs)
    study.add_trial(trial)


def _sample(study: optuna.Study, distributions: dict, evaluate: Callable, texts: int, prune: bool) -> None:
    """One trial from the sampler, run by study.optimize: it first marks FAIL the trials of workers whose
    heartbeat stopped, beats for this trial while it runs, and marks it FAIL on any error, Ctrl-C included,
    so no trial stays RUNNING in a shared study. With `prune` (one objective: Optuna prunes no other), a trial
    whose early figure falls far below the best is marked PRUNED at it, which TPE still learns from."""
    best_early = max((t.user_attrs["prediction"].get("early_speedup", 0.0) for t in completed(study)), default=0.0)
    prune_below = PRUNE_SHARE * best_early if prune and best_early else None

    def objective(trial: optuna.Trial) -> list[float]:
        trial.set_user_attr("worker", WORKER)  # first, so a trial left by a killed worker says whose it was
        values, attrs = evaluate({name: _suggest(trial, name, d) for name, d in distributions.items()}, prune_below)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        scored = attrs["prediction"]["texts"]
        if scored < texts:
            trial.report(values[0], step=scored)
            raise optuna.TrialPruned()
        return values

    study.optimize(objective, n_trials=1)


def _suggest(trial: optuna.Trial, name: str, d: optuna.distributions.BaseDistribution) -> object:
    """trial.suggest_* for a distribution given as an object, as study.ask(fixed_distributions) takes them."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, d.choices)
    suggest = trial.suggest_int if isinstance(d, optuna.distributions.IntDistribution) else trial.suggest_float
    return suggest(name, d.low, d.high, step=d.step, log=d.log)


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def pruned(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))


def best_predicted(study: optuna.Study) -> float | None:
    return max((t.values[0] for t in completed(study)), default=None)


def pick_finalists(study: optuna.Study, count: int) -> list[optuna.trial.FrozenTrial]:
    """The `count` best drafts by predicted speedup, Pareto-optimal ones first, one per draft structure.

    One per structure (skipped sublayers and exit, and which sources draft), because the surrogate's floor
    and width choices replay the real loop closely, while how a structure's costs and agreement carry over
    to unseen prompts is what it can get wrong: distinct structures give the timed comparison more to find.
    Drafts that cannot win whatever the cost model's error are left out: one whose tokens almost never
    land (a round then costs a draft step plus a verify pass for one token, more than a plain step), and
    a layer draft that runs the whole model (each draft token costs a full step: at best it ties the plain
    loop).
    """
    front = {t.number for t in study.best_trials}
    ranked = sorted(completed(study), key=lambda t: (t.number not in front, -t.values[0]))
    picked, seen = [], set()
    for trial in ranked:
        s = Schedule.from_dict(trial.user_attrs["schedule"])
        forms = (s.int8_attn, s.int8_mlp, s.int4_attn, s.int4_mlp, s.head_precision, s.head_vocab)
        structure = (s.skip_attn, s.skip_mlp, forms, s.exit_layer, s.max_draft > 0, s.context_ngram > 0)
        lighter = s.inexact_layers or s.head_precision != "exact" or s.head_vocab
        shallower = lighter or s.exit_layer is not None
        useful = s.drafting and (s.max_draft == 0 or shallower)
        lands = trial.user_attrs["prediction"]["accepted_length"] >= MIN_ACCEPTED_LENGTH
        if useful and lands and structure not in seen:
            seen.add(structure)
            picked.append(trial)
    return picked[:count]


def contenders(study: optuna.Study, count: int, num_layers: int) -> list[optuna.trial.FrozenTrial]:
    """The finalists, and the built-in default's trial where it is not among them: what `wrap(model)` runs before
    any tune, so the schedule tune records must beat it on the same held-out prompts, not just the plain loop."""
    picked = pick_finalists(study, count)
    builtin = space.params_for(builtin_default(num_layers), num_layers)
    if count and all(t.params != builtin for t in picked):
        picked += [t for t in completed(study) if t.params == builtin][:1]
    return picked


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    runs: list[Measurement],
    prompts: list[Prompt],
    config: TuneConfig,
    reporter: Reporter,
) -> list[Prompt]:
    """Timed greedy generation of every schedule on the prompts, runs[0] being the plain loop; returns the
    prompts measured (the time budget may cut them short).

    Schedules take turns on each prompt, in an order that rotates, so a slow spell on a shared machine
    lands on all of them alike instead of on whichever ran in that minute.
    """
    fast = [wrap(model, run.schedule) for run in runs]
    inputs = [encode_prompt(tokenizer, p.text) for p in prompts]
    for f in fast:  # warm-up: first calls allocate and pick kernels
        f.generate(inputs[0], max_new_tokens=4, do_sample=False)
    reporter.measure(len(runs) * len(inputs), config.measure_seconds)
    started, done = time.perf_counter(), 0
    for j, ids in enumerate(inputs):
        if j and time.perf_counter() - started > config.measure_seconds:
            return prompts[:j]
        outputs = {}
        for k in range(len(runs)):
            i = (j + k) % len(runs)
            outputs[i] = fast[i].generate(ids, max_new_tokens=config.measure_tokens, do_sample=False)
            runs[i].stats.merge(fast[i].last_stats)
            done += 1
            reporter.measured(done, _best_speedup(runs))
        for i in range(1, len(runs)):
            runs[i].differing_outputs += not torch.equal(outputs[i], outputs[0])
    return prompts


def _best_speedup(runs: list[Measurement]) -> float | None:
    plain = runs[0].stats.tokens_per_second
    measured = [r.stats.tokens_per_second for r in runs[1:] if r.stats.rounds]
    return max(measured) / plain if plain and measured else None


def speedup(run: Measurement, plain: Measurement) -> float:
    return run.stats.tokens_per_second / plain.stats.tokens_per_second


def _record(run: Measurement, plain: Measurement) -> dict:
    return {
        "trial": run.trial.number if run.trial else None,
        "schedule": {k: v for k, v in run.schedule.to_dict().items() if k not in ("format", "meta")},
        "predicted": run.prediction,
        "tokens_per_second": round(run.stats.tokens_per_second, 3),
        "speedup": round(speedup(run, plain), 4),
        "mean_accepted_length": round(run.stats.mean_accepted_length, 3),
        "differing_outputs": run.differing_outputs,
    }


def _chosen_meta(chosen: Measurement | None, plain: Measurement) -> dict:
    """The written schedule's own figures; the surrogate's are None when drafting is off."""
    run = chosen or plain
    predicted = run.prediction
    return {
        "tokens_per_second": round(run.stats.tokens_per_second, 3),
        "speedup": round(speedup(run, plain), 4),
        "mean_accepted_length": round(run.stats.mean_accepted_length, 3),
        "alpha": predicted.get("agreement"),
        "c": predicted.get("draft_cost"),
        "context_share": predicted.get("context_share"),
        "predicted_bound": predicted.get("bound"),
        "predicted_speedup": predicted.get("speedup"),
    }


def _meta(
    study: optuna.Study, config: TuneConfig, runs: list[Measurement], chosen: Measurement | None, prompts: dict
) -> dict:
    plain = runs[0]
    return {
        **study.user_attrs["setup"],  # model identity, dtype, device: what wrap() checks a schedule against
        "torch_threads": torch.get_num_threads(),
        "plain_tokens_per_second": round(plain.stats.tokens_per_second, 3),
        **_chosen_meta(chosen, plain),
        "finalists": [_record(run, plain) for run in runs[1:]],
        "prompts": prompts,
        "study": study.study_name,
        "trials": len(completed(study)),
        "trials_pruned": pruned(study),
        "objective": config.objective,
        "seed": config.seed,
    }


def lowbit_kernels(model: PreTrainedModel, schemes: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Which kernel runs each low-bit scheme's layers and head here, as measured when its weights were built."""
    adapter = engine_adapter(model)
    return {scheme: draft_weights(adapter, scheme).kernels for scheme in schemes}


def choose(runs: list[Measurement]) -> Measurement | None:
    """The fastest measured finalist, if it clearly beats the plain loop (runs[0])."""
    best = max(runs[1:], key=lambda r: r.stats.tokens_per_second, default=None)
    if best is None or speedup(best, runs[0]) < MIN_SPEEDUP:
        return None
    return best


def tune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    calibration: list[Prompt],
    held_out: list[Prompt],
    config: TuneConfig,
    reporter: Reporter | None = None,
) -> TuneResult:
    """Search, measure the finalists against the plain loop, and write the best measured schedule to config.out;
    record it as this model's, dtype's and machine's too, for `wrap(model)` given no schedule.

    With config.finalists == 0 it only adds trials to the study and writes nothing.
    """
    reporter = reporter or Reporter()
    started = time.perf_counter()
    study = open_study(config)
    texts, costs, frequent = calibrate(study, model, tokenizer, name, calibration, config, reporter)
    if config.trials > 0:
        search(study, model, texts, costs, frequent, config, reporter)
    if config.finalists == 0:
        return TuneResult(Schedule.plain(), None, [], None, len(completed(study)), pruned(study))
    finalists = [
        Measurement(Schedule.from_dict(t.user_attrs["schedule"]), t)
        for t in contenders(study, config.finalists, costs.num_layers)
    ]
    runs = [Measurement(Schedule.plain(), None), *finalists]
    measured = measure(model, tokenizer, runs, held_out, config, reporter)
    chosen = choose(runs)
    prompts = {"calibration": [p.question_id for p in calibration], "held_out": [p.question_id for p in measured]}
    meta = _meta(study, config, runs, chosen, prompts) | {
        "kernels": lowbit_kernels(model, costs.schemes),
        "tuning_seconds": round(time.perf_counter() - started, 1),
    }
    schedule = (chosen.schedule if chosen else Schedule.plain()).with_meta(**meta)
    schedule.to_file(config.out)
    recorded = record(schedule, model, name)  # what `wrap(model)` then runs here when given no schedule
    return TuneResult(schedule, runs[0], finalists, chosen, meta["trials"], meta["trials_pruned"], recorded)
