"""Predicted speed of a schedule without running it: teacher-forced agreement, simulated rounds, measured costs.

For each calibration text (a prompt and the model's own greedy continuation) the draft scores every
continuation position in one batched pass; its greedy token agrees with the full model's or not, with some
annealed confidence. Replaying the decode loop's rounds over those positions (width bound, confidence
floor, adaptive width) gives the accepted length per round, and the costs turn rounds into seconds.
A context draft needs no pass at all: the text is the model's own greedy output, so what a copy proposes
and how much of it the model keeps is known exactly; the replay runs the engine's own index and chooser.
"""

import math
from dataclasses import astuple, dataclass, replace

import torch
from selfspec.evals.floor import draft_weight_bytes
from transformers import PreTrainedModel

from selfspec.drafts import SOURCE_CONTEXT, SOURCE_LAYER, SOURCE_PLAIN, LayerDrafter, SourceChooser, Width
from selfspec.drafts.head import DraftHead
from selfspec.drafts.ngram import NgramIndex
from selfspec.engine.cache import PositionedCache
from selfspec.engine.fused import engine_adapter
from selfspec.engine.runner import Plan, Runner
from selfspec.sampling import greedy_index
from selfspec.schedule import Schedule

from .costs import Costs
from .teacher import Continuation, held_out_rankings


@dataclass
class Text:
    """One calibration text with the full model's states at every layer boundary, so a draft starts at its
    exact prefix instead of layer 0, and the full model's K/V at every position and layer.

    A draft is scored at the continuation positions only, over the exact K/V of the prompt, as in decoding
    (where the prompt's K/V come from the prefill); the continuation's own K/V are the draft's, a slightly
    pessimistic stand-in for decoding, where all but the current round's are exact.
    """

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [N] positions whose next token is part of the continuation
    states: list[torch.Tensor]  # L + 1 of [1, T, D]: states[l] enters layer l
    targets: torch.Tensor  # [N] the full model's greedy token after each position
    runner: Runner  # over a cache holding the full model's K/V for positions [0, T) at every layer
    head_ranking: tuple[int, ...]  # the most frequent tokens of other calibration texts (`held_out_rankings`)

    @property
    def prompt(self) -> list[int]:
        return self.tokens[: int(self.positions[0]) + 1].tolist()

    def draft_states(self, start: int, stop: int, plan: Plan) -> torch.Tensor:
        """[1, N, D]: the continuation positions' states after layers [start, stop) run as `plan`, from the
        exact states entering `start`. Writes the cache at those positions only, at layers [start, stop), where
        every later call writes before it reads; the prompt's K/V stay exact."""
        h = self.states[start][:, self.positions]
        if start >= stop:
            return h
        span = self.runner.span(h, int(self.positions[0]))
        return self.runner.layers(h, span, start, stop, plan)


@dataclass(frozen=True)
class Scored:
    """The draft at each position of one text."""

    agree: list[bool]
    confidence: list[float]


@dataclass(frozen=True)
class Prediction:
    agreement: float  # alpha: share of positions where the layer draft's greedy token is the full model's
    draft_cost: float  # c: one layer-draft token over one plain step
    accepted_length: float  # tokens emitted per verify pass
    speedup: float  # plain step time over predicted time per token
    bound: float  # Leviathan et al.'s expected speedup of the layer draft for alpha, gamma = max_draft, c
    context_acceptance: float = 0.0  # share of copied proposals the model kept
    context_share: float = 0.0  # share of emitted tokens that were kept copies
    draft_bytes: float = 0.0  # weight bytes one layer-draft token reads
    early_speedup: float = 0.0  # the speedup predicted on the first texts alone (`early_texts`)
    texts: int = 0  # calibration texts scored: fewer than all when the early figure pruned the schedule

    def to_dict(self) -> dict:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class Replay:
    """What replaying the decode loop over the calibration texts gave."""

    seconds: float = 0.0
    rounds: int = 0
    tokens: int = 0
    context_drafted: int = 0
    context_accepted: int = 0

    def __add__(self, other: "Replay") -> "Replay":
        return Replay(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def speedup(self, step: float) -> float:
        """Plain steps of `step` seconds for these tokens over the replayed time."""
        return self.tokens * step / self.seconds


@torch.inference_mode()
def prepare(model: PreTrainedModel, continuations: list[Continuation]) -> list[Text]:
    adapter = engine_adapter(model)
    texts = []
    for c, ranking in zip(continuations, held_out_rankings(continuations)):
        runner = Runner(adapter, PositionedCache(adapter.num_layers, c.tokens.numel()))
        states = [runner.embed(c.tokens.tolist())]
        span = runner.span(states[0], 0)
        for layer in range(adapter.num_layers):
            states.append(runner.layers(states[-1], span, layer, layer + 1))
        positions = torch.arange(c.prompt_length - 1, c.tokens.numel() - 1)
        targets = adapter.logits(states[-1][:, positions])[0].argmax(-1)
        texts.append(Text(c.tokens, positions, states, targets, runner, ranking))
    return texts


def drafter_for(model: PreTrainedModel, schedule: Schedule) -> LayerDrafter:
    """The engine's drafter, for its exact prefix depth and annealing temperatures; it runs nothing here."""
    adapter = engine_adapter(model)
    return LayerDrafter(Runner(adapter, PositionedCache(adapter.num_layers, 1)), schedule)


@torch.inference_mode()
def score(
    model: PreTrainedModel, texts: list[Text], schedule: Schedule, drafter: LayerDrafter | None = None
) -> list[Scored]:
    """Teacher-forced draft agreement and annealed confidence at every position (one pass per text)."""
    drafter = drafter or drafter_for(model, schedule)
    exit_layer = drafter.exits[-1]
    start = drafter.exact_depth
    heads: dict[tuple[int, ...], DraftHead] = {}
    out = []
    for text in texts:
        h = text.draft_states(start, exit_layer, drafter.plan)
        head = _held_out_head(drafter, schedule, text, heads)
        head.begin(text.prompt)  # the draft head also scores the prompt's tokens
        scores, ids = head.scores(h)  # [1, N, S]: the tokens the draft head scores, as decoding reads them
        scores = scores[0].float()
        if schedule.confidence > 0:
            confidence, places = torch.softmax(scores / drafter.temperatures[exit_layer], dim=-1).max(-1)
        else:  # no floor: a round never looks at its confidence, so the softmax over the vocabulary is skipped
            places = greedy_index(scores)
            confidence = torch.ones(len(places))
        tokens = places if ids is None else ids[places]
        out.append(Scored((tokens == text.targets).tolist(), confidence.tolist()))
    return out


def _held_out_head(drafter: LayerDrafter, schedule: Schedule, text: Text, heads: dict) -> DraftHead:
    """The head `text` is scored with: the drafter's, or where it ranks frequent tokens, the same head over tokens
    ranked the same way on other texts (else it would know this text's every token in advance)."""
    if not schedule.head_tokens:
        return drafter.head
    ranking = text.head_ranking[: len(schedule.head_tokens)]
    if ranking == drafter.schedule.head_tokens:
        return drafter.head
    if ranking not in heads:
        heads[ranking] = DraftHead(drafter.runner.adapter, replace(schedule, head_tokens=ranking))
    return heads[ranking]


def simulate(
    texts: list[Text],
    scored: list[Scored] | None,
    schedule: Schedule,
    costs: Costs,
    exact_depth: int,
    draft_step: float,
) -> Replay:
    """Replay the decode loop's rounds over every continuation position of every text; `scored` is the layer
    draft's teacher-forced scoring (None when the schedule has no layer draft)."""
    replay = Replay()
    for i, text in enumerate(texts):
        tokens = text.tokens.tolist()
        first, n = int(text.positions[0]), len(text.positions)
        layer_width = Width(schedule.max_draft, schedule.adaptive_width)
        index = NgramIndex(schedule.context_min_ngram, schedule.context_ngram) if schedule.context_ngram else None
        if index is not None:
            index.extend(tokens[: first + 1])
        chooser, t = SourceChooser(), 0
        while t < n:
            room = n - t - 1
            copied = []
            if index is not None and room and chooser.prefer_context():
                copied = index.propose(min(schedule.context_max_draft, room))
            if copied:
                truth = tokens[first + t + 1 : first + t + 1 + len(copied)]
                accepted = next((j for j, (a, b) in enumerate(zip(copied, truth)) if a != b), len(copied))
                seconds, source = costs.verify_pass(len(copied) + 1, 0), SOURCE_CONTEXT
                replay.context_drafted += len(copied)
                replay.context_accepted += accepted
            elif scored is not None:
                accepted, seconds = _layer_round(scored[i], t, min(layer_width.current, room), schedule, costs,
                                                 exact_depth, draft_step, layer_width)  # fmt: skip
                source = SOURCE_LAYER
            else:
                accepted, seconds, source = 0, costs.step, SOURCE_PLAIN
            chooser.record(source, accepted + 1, seconds)
            if index is not None:
                index.extend(tokens[first + t + 1 : first + t + 2 + accepted])
            replay.seconds += seconds
            replay.rounds += 1
            t += accepted + 1
        replay.tokens += n
    return replay


def _layer_round(
    s: Scored, t: int, room: int, schedule: Schedule, costs: Costs, exact_depth: int, draft_step: float, width: Width
) -> tuple[int, float]:
    """(accepted, seconds) of a layer-draft round starting at continuation position t."""
    proposed = 0
    while proposed < room:
        proposed += 1  # an unsure token is proposed too; the round ends after it
        if s.confidence[t + proposed - 1] < schedule.confidence:
            break
    accepted = next((i for i in range(proposed) if not s.agree[t + i]), proposed)
    width.update(proposed, accepted)
    return accepted, _round_seconds(costs, proposed, exact_depth, draft_step)


def _round_seconds(costs: Costs, proposed: int, exact_depth: int, draft_step: float) -> float:
    if proposed == 0:
        return costs.step  # no room left: the loop feeds the pending token through the whole model
    # One draft step per proposal; the last proposal was never fed through the draft, so the drafter brings
    # it up to the exact prefix before the verify pass.
    return proposed * draft_step + costs.prefix(exact_depth) + costs.verify_pass(proposed + 1, exact_depth)


def leviathan_bound(alpha: float, gamma: int, c: float) -> float:
    """(1 - a^(g+1)) / ((1 - a)(g c + 1)): expected speedup with i.i.d. acceptance a, g drafts, cost ratio c."""
    tokens = gamma + 1 if math.isclose(alpha, 1.0) else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


def early_texts(count: int) -> int:
    """How many calibration texts a schedule is scored on before it may be pruned."""
    return max(1, count // 3)


def predict(
    model: PreTrainedModel, texts: list[Text], costs: Costs, schedule: Schedule, prune_below: float | None = None
) -> Prediction:
    """The schedule's predicted speed over `texts`. With `prune_below`, a schedule whose speedup on the first
    `early_texts` falls below it is not scored on the rest: most sampled drafts are far off the best, and the
    teacher-forced passes are nearly all of a trial's time."""
    if not schedule.drafting:
        return Prediction(0.0, 0.0, 1.0, 1.0, 1.0, texts=len(texts))
    drafter, draft_step, exact_depth = None, 0.0, 0
    if schedule.max_draft > 0:
        # its head ranked as the first texts are scored (`_held_out_head`): a head is dear to build
        drafter = drafter_for(model, replace(schedule, head_tokens=texts[0].head_ranking[: len(schedule.head_tokens)]))
        draft_step = costs.draft_step(drafter.exits[-1], schedule)
        exact_depth = drafter.exact_depth

    def replayed(part: list[Text]) -> tuple[list[Scored] | None, Replay]:
        scored = score(model, part, schedule, drafter) if drafter else None
        return scored, simulate(part, scored, schedule, costs, exact_depth, draft_step)

    counted = early_texts(len(texts))
    scored, replay = replayed(texts[:counted])
    early_speedup = replay.speedup(costs.step)
    if prune_below is None or early_speedup >= prune_below:
        more, rest = replayed(texts[counted:])
        scored, replay, counted = (scored + more if drafter else None), replay + rest, len(texts)
    alpha = sum(sum(s.agree) for s in scored) / sum(len(s.agree) for s in scored) if scored else 0.0
    c = draft_step / costs.step
    return Prediction(
        agreement=alpha,
        draft_cost=c,
        accepted_length=replay.tokens / replay.rounds,
        speedup=replay.speedup(costs.step),
        bound=leviathan_bound(alpha, schedule.max_draft, c) if schedule.max_draft else 1.0,
        context_acceptance=replay.context_accepted / replay.context_drafted if replay.context_drafted else 0.0,
        context_share=replay.context_accepted / replay.tokens,
        draft_bytes=draft_weight_bytes(model, schedule) if schedule.max_draft else 0.0,
        early_speedup=early_speedup,
        texts=counted,
    )
