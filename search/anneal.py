"""Fitting the annealing strength a, so that a draft's confidence means what it says.

A draft token's confidence is its probability under softmax(logits / T_l), T_l = 1 + a (1 - l / L), read
at the exit it leaves from. It is well calibrated when, among tokens drafted with confidence near p, a
share p is what the full model would have said. The fit picks the a that minimises the expected
calibration error (ECE) of that confidence against agreement, over teacher-forced calibration texts,
pooling every candidate exit of the schedule (one a serves them all, as in the engine).
"""

from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel

from selfspec.schedule import Schedule

from .surrogate import Text, drafter_for

BINS = 10
GRID = tuple(i / 10 for i in range(0, 81))  # a in [0, 8]: shallow exits can need T well above 3


@dataclass(frozen=True)
class Calibration:
    anneal_before: float
    ece_before: float
    anneal: float  # the fitted a
    ece: float  # at the fitted a
    positions: int  # drafted positions pooled over texts and exits

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def expected_calibration_error(confidence: torch.Tensor, agree: torch.Tensor, bins: int = BINS) -> float:
    """sum over equal-width confidence bins of (share of positions) * |agreement rate - mean confidence|."""
    which = (confidence * bins).long().clamp(max=bins - 1)  # [N]
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap = agree[inside].float().mean() - confidence[inside].mean()
            total += float(inside.float().mean() * gap.abs())
    return total


@dataclass
class ExitScores:
    """The draft's logits at one exit over every calibration position, and whether its argmax agrees."""

    exit_layer: int
    logits: torch.Tensor  # [N, V] float32
    agree: torch.Tensor  # [N] bool


@torch.inference_mode()
def exit_scores(model: PreTrainedModel, texts: list[Text], schedule: Schedule) -> list[ExitScores]:
    drafter = drafter_for(model, schedule)
    out = []
    for exit_layer in drafter.exits:
        start = min(drafter.exact_depth, exit_layer)
        logits, agree = [], []
        for text in texts:
            drafter.begin(text.prompt)
            rows = drafter.head(text.draft_states(start, exit_layer, drafter.plan))[0].float()  # [N_text, V]
            logits.append(rows)
            agree.append(rows.argmax(-1) == text.targets)
        out.append(ExitScores(exit_layer, torch.cat(logits), torch.cat(agree)))
    return out


def ece_at(model: PreTrainedModel, scores: list[ExitScores], schedule: Schedule, anneal: float) -> float:
    temperatures = drafter_for(model, replace(schedule, anneal=anneal)).temperatures
    confidence = torch.cat([torch.softmax(s.logits / temperatures[s.exit_layer], -1).amax(-1) for s in scores])
    agree = torch.cat([s.agree for s in scores])
    return expected_calibration_error(confidence, agree)


def fit_anneal(model: PreTrainedModel, texts: list[Text], schedule: Schedule) -> Calibration:
    """The a on GRID with the lowest ECE for this schedule's draft, with the ECE at the schedule's own a."""
    if schedule.max_draft == 0:
        raise ValueError("the schedule has no layer draft: there is no draft confidence to calibrate")
    scores = exit_scores(model, texts, schedule)
    errors = {a: ece_at(model, scores, schedule, a) for a in GRID}
    best = min(errors, key=errors.get)
    return Calibration(
        anneal_before=schedule.anneal,
        ece_before=ece_at(model, scores, schedule, schedule.anneal),
        anneal=best,
        ece=errors[best],
        positions=sum(s.agree.numel() for s in scores),
    )
