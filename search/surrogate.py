"""Predicted speed of a schedule without running it: teacher-forced agreement, simulated rounds, measured costs.

For each calibration text (a prompt and the model's own greedy continuation) the draft scores every
continuation position in one batched pass; its greedy token agrees with the full model's or not, with some
annealed confidence. Replaying the decode loop's rounds over those positions (width bound, confidence
floor, adaptive width) gives the accepted length per round, and the costs turn rounds into seconds.
"""

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from selfspec.adapter import adapter_for
from selfspec.cache import PositionedCache
from selfspec.drafting import LayerDrafter
from selfspec.loop import Width
from selfspec.runner import Runner
from selfspec.schedule import Schedule

from .costs import Costs
from .teacher import Continuation, hidden_after, logits_of


@dataclass
class Text:
    """One calibration text with the full model's states at every layer boundary, so a draft starts at its
    exact prefix instead of layer 0."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [N] positions whose next token is part of the continuation
    states: list[torch.Tensor]  # L + 1 of [1, T, D]: states[l] enters layer l
    targets: torch.Tensor  # [N] the full model's greedy token after each position


@dataclass(frozen=True)
class Scored:
    """The draft at each position of one text."""

    agree: list[bool]
    confidence: list[float]


@dataclass(frozen=True)
class Prediction:
    agreement: float  # alpha: share of positions where the draft's greedy token is the full model's
    draft_cost: float  # c: one draft token over one plain step
    accepted_length: float  # tokens emitted per verify pass
    speedup: float  # plain step time over predicted time per token
    bound: float  # Leviathan et al.'s expected speedup for alpha, gamma = max_draft, c

    def to_dict(self) -> dict:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@torch.inference_mode()
def prepare(model: PreTrainedModel, continuations: list[Continuation]) -> list[Text]:
    num_layers = adapter_for(model).num_layers
    texts = []
    for c in continuations:
        states = [hidden_after(model, c.tokens, 0)]
        for layer in range(num_layers):
            states.append(hidden_after(model, c.tokens, layer + 1, start=states[-1], first=layer))
        positions = torch.arange(c.prompt_length - 1, c.tokens.numel() - 1)
        targets = logits_of(model, states[-1][:, positions]).argmax(-1)
        texts.append(Text(c.tokens, positions, states, targets))
    return texts


def drafter_for(model: PreTrainedModel, schedule: Schedule) -> LayerDrafter:
    """The engine's drafter, for its exact prefix depth and annealing temperatures; it runs nothing here."""
    adapter = adapter_for(model)
    return LayerDrafter(Runner(adapter, PositionedCache(adapter.num_layers, 1)), schedule)


@torch.inference_mode()
def score(model: PreTrainedModel, texts: list[Text], schedule: Schedule) -> list[Scored]:
    """Teacher-forced draft agreement and annealed confidence at every position (one pass per text)."""
    drafter = drafter_for(model, schedule)
    exit_layer = drafter.exits[-1]
    start = drafter.exact_depth
    out = []
    for text in texts:
        h = text.states[start]
        if start < exit_layer:
            h = hidden_after(model, text.tokens, exit_layer, drafter.skip_attn, drafter.skip_mlp, h, start)
        logits = logits_of(model, h[:, text.positions]).float()  # [N, V]
        confidence, tokens = torch.softmax(logits / drafter.temperatures[exit_layer], dim=-1).max(-1)
        out.append(Scored((tokens == text.targets).tolist(), confidence.tolist()))
    return out


def simulate(
    scored: list[Scored], schedule: Schedule, costs: Costs, exact_depth: int, draft_step: float
) -> tuple[float, int]:
    """Replay the decode loop's rounds; returns (seconds, rounds) for all positions of all texts."""
    seconds, rounds = 0.0, 0
    for s in scored:
        width = Width(schedule.max_draft, schedule.adaptive_width)
        n, t = len(s.agree), 0
        while t < n:
            room = min(width.current, n - t - 1)
            proposed, steps = 0, 0
            while proposed < room:
                steps += 1
                if s.confidence[t + proposed] < schedule.confidence:
                    break
                proposed += 1
            accepted = next((i for i in range(proposed) if not s.agree[t + i]), proposed)
            seconds += _round_seconds(costs, proposed, steps, exact_depth, draft_step)
            width.update(proposed, accepted)
            rounds += 1
            t += accepted + 1
    return seconds, rounds


def _round_seconds(costs: Costs, proposed: int, steps: int, exact_depth: int, draft_step: float) -> float:
    if steps == 0:
        return costs.step  # no room left: the loop feeds the pending token through the whole model
    seconds = steps * draft_step + costs.verify_pass(proposed + 1, exact_depth)
    if steps == proposed:
        # Every drafted token was confident, so the last proposal was never fed through the draft: the
        # drafter brings it up to the exact prefix before the verify pass.
        seconds += costs.prefix(exact_depth)
    return seconds


def leviathan_bound(alpha: float, gamma: int, c: float) -> float:
    """(1 - a^(g+1)) / ((1 - a)(g c + 1)): expected speedup with i.i.d. acceptance a, g drafts, cost ratio c."""
    tokens = gamma + 1 if math.isclose(alpha, 1.0) else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


def predict(model: PreTrainedModel, texts: list[Text], costs: Costs, schedule: Schedule) -> Prediction:
    if not schedule.drafting:
        return Prediction(0.0, 0.0, 1.0, 1.0, 1.0)
    drafter = drafter_for(model, schedule)
    draft_step = costs.draft_step(drafter.exits[-1], drafter.skip_attn, drafter.skip_mlp)
    scored = score(model, texts, schedule)
    seconds, rounds = simulate(scored, schedule, costs, drafter.exact_depth, draft_step)
    tokens = sum(len(s.agree) for s in scored)
    alpha = sum(sum(s.agree) for s in scored) / tokens
    c = draft_step / costs.step
    return Prediction(
        agreement=alpha,
        draft_cost=c,
        accepted_length=tokens / rounds,
        speedup=tokens * costs.step / seconds,
        bound=leviathan_bound(alpha, schedule.max_draft, c),
    )
