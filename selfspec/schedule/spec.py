"""The draft schedule's fields: which sublayers the draft skips, where it may exit, and how far a round may guess.

A schedule is plain data, stored as versioned JSON (never pickle) and validated against the model it runs on.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ScheduleError
from ..files import write_json_atomic

FORMAT = "selfspec.schedule/2"
READABLE_FORMATS = ("selfspec.schedule/1", FORMAT)  # /1 had no low-bit forms and no cheap head: all exact
MAX_NGRAM = 8
PRECISIONS = ("exact", "int8", "int4")
LOWBIT_FIELDS = ("int8_attn", "int8_mlp", "int4_attn", "int4_mlp")
LAYER_FIELDS = ("skip_attn", "skip_mlp", "exit_layers", *LOWBIT_FIELDS)


@dataclass(frozen=True)
class Schedule:
    """Draft settings.

    skip_attn / skip_mlp: layers whose attention / MLP sublayer the draft skips (the residual passes through).
    exit_layer: the draft runs layers [0, exit_layer) then the final norm and LM head (None: all layers).
    exit_layers: candidate exits for per-token dynamic exit: a draft token leaves at the first candidate whose
        annealed confidence reaches `confidence` (overrides exit_layer when given).
    max_draft: width bound, drafted tokens per round (0: drafting off, the plain decoder).
    anneal: a in T_l = 1 + a * (1 - l / L); draft logits from effective depth l are divided by T_l before
        their confidence is read.
    confidence: the round ends at the first draft token whose annealed probability is below this floor (that token
        is still proposed; 0: no floor).
    max_depth: depth bound for dynamic exit; a token that would need a deeper exit ends the round.
    adaptive_width: grow the width after fully accepted rounds, shrink it after a rejection.
    context_ngram: longest tail n-gram a context draft looks up in the prompt and the text so far, copying
        what followed it (0: context drafts off). With it on, each round takes the context copy when the tail
        recurs and copies have lately emitted tokens fastest, else the layer draft above (or a plain step
        when max_draft is 0).
    context_min_ngram: shortest tail n-gram the context draft accepts as a match.
    context_max_draft: tokens a context draft copies (fewer where the copied span or max_new_tokens ends).
    int8_attn / int8_mlp / int4_attn / int4_mlp: layers whose sublayer the draft runs over a derived int8 or int4
        weight-only copy of its matrices (`selfspec.lowbit`); a sublayer is skipped, low-bit or exact, one of them.
    head_precision: the draft's LM head: exact, int8 or int4.
    head_vocab: the draft scores only this many tokens (0: the whole vocabulary): `head_tokens` first, then the
        lowest token ids (byte-level BPE numbers merges by frequency), plus each prompt's own tokens.
    head_tokens: the most frequent tokens of the model's own text, most frequent first.
    """

    skip_attn: tuple[int, ...] = ()
    skip_mlp: tuple[int, ...] = ()
    exit_layer: int | None = None
    exit_layers: tuple[int, ...] = ()
    max_draft: int = 4
    anneal: float = 0.0
    confidence: float = 0.0
    max_depth: int | None = None
    adaptive_width: bool = False
    context_ngram: int = 0
    context_min_ngram: int = 1
    context_max_draft: int = 10
    int8_attn: tuple[int, ...] = ()
    int8_mlp: tuple[int, ...] = ()
    int4_attn: tuple[int, ...] = ()
    int4_mlp: tuple[int, ...] = ()
    head_precision: str = "exact"
    head_vocab: int = 0
    head_tokens: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in LAYER_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
                raise ScheduleError(f"schedule field {name} must be a list of layer indices, got {value!r}")
            object.__setattr__(self, name, tuple(sorted(set(value))))
        self._check_forms()
        _check(
            _is_int(self.max_draft) and self.max_draft >= 0,
            f"max_draft must be an integer >= 0, got {self.max_draft!r}",
        )
        _check(self.max_draft <= 64, f"max_draft must be <= 64, got {self.max_draft}")
        _check(_is_number(self.anneal) and self.anneal >= 0, f"anneal must be a number >= 0, got {self.anneal!r}")
        _check(
            _is_number(self.confidence) and 0.0 <= self.confidence <= 1.0,
            f"confidence must be in [0, 1], got {self.confidence!r}",
        )
        for name in ("exit_layer", "max_depth"):
            value = getattr(self, name)
            _check(
                value is None or (_is_int(value) and value >= 1),
                f"{name} must be None or an integer >= 1, got {value!r}",
            )
        _check(
            isinstance(self.adaptive_width, bool), f"adaptive_width must be true or false, got {self.adaptive_width!r}"
        )
        _check(
            _is_int(self.context_ngram) and 0 <= self.context_ngram <= MAX_NGRAM,
            f"context_ngram must be an integer in [0, {MAX_NGRAM}], got {self.context_ngram!r}",
        )
        _check(
            _is_int(self.context_min_ngram) and 1 <= self.context_min_ngram <= max(1, self.context_ngram),
            f"context_min_ngram must be an integer in [1, {max(1, self.context_ngram)}] (1 to context_ngram), "
            f"got {self.context_min_ngram!r}",
        )
        _check(
            _is_int(self.context_max_draft) and 1 <= self.context_max_draft <= 64,
            f"context_max_draft must be an integer in [1, 64], got {self.context_max_draft!r}",
        )

    def _check_forms(self) -> None:
        for kind in ("attn", "mlp"):
            names = (f"skip_{kind}", f"int8_{kind}", f"int4_{kind}")
            for a, b in ((0, 1), (0, 2), (1, 2)):
                both = sorted(set(getattr(self, names[a])) & set(getattr(self, names[b])))
                _check(not both, f"layers {both} are in both {names[a]} and {names[b]}; a sublayer has one form")
        _check(
            self.head_precision in PRECISIONS,
            f"head_precision must be one of {', '.join(PRECISIONS)}, got {self.head_precision!r}",
        )
        _check(
            _is_int(self.head_vocab) and self.head_vocab >= 0,
            f"head_vocab must be an integer >= 0, got {self.head_vocab!r}",
        )
        tokens = self.head_tokens
        _check(
            isinstance(tokens, (tuple, list)) and all(_is_int(t) and t >= 0 for t in tokens),
            f"head_tokens must be a list of token ids, got {tokens!r}",
        )
        object.__setattr__(self, "head_tokens", tuple(tokens))
        _check(
            len(tokens) <= self.head_vocab or not tokens,
            f"head_tokens has {len(tokens)} tokens, more than head_vocab {self.head_vocab}",
        )

    def sublayer_form(self, kind: str, layer: int) -> str:
        """'skip', 'int8', 'int4' or 'exact': how the layer draft runs that layer's `kind` (attn or mlp)."""
        for form in ("skip", "int8", "int4"):
            if layer in getattr(self, f"{form}_{kind}"):
                return form
        return "exact"

    @property
    def lowbit_layers(self) -> set[int]:
        """Layers with a sublayer the layer draft runs over low-bit weights."""
        return {i for name in LOWBIT_FIELDS for i in getattr(self, name)}

    @property
    def inexact_layers(self) -> set[int]:
        """Layers where the layer draft departs from the full model (a skipped or low-bit sublayer)."""
        return self.lowbit_layers | set(self.skip_attn) | set(self.skip_mlp)

    @property
    def body_schemes(self) -> tuple[str, ...]:
        """The low-bit schemes the layer draft's sublayers run."""
        return tuple(s for s in ("int8", "int4") if getattr(self, f"{s}_attn") or getattr(self, f"{s}_mlp"))

    @property
    def lowbit_schemes(self) -> set[str]:
        """Every low-bit scheme the layer draft reads: its sublayers' and its head's."""
        return set(self.body_schemes) | ({self.head_precision} - {"exact"})

    @classmethod
    def plain(cls) -> "Schedule":
        """Drafting off: the plain decoder through the same loop."""
        return cls(max_draft=0)

    @property
    def drafting(self) -> bool:
        return self.max_draft > 0 or self.context_ngram > 0

    @property
    def max_verify_width(self) -> int:
        """The most tokens one verify pass takes: the pending token and the widest draft."""
        return 1 + max(self.max_draft, self.context_max_draft if self.context_ngram > 0 else 0)

    def exits(self, num_layers: int) -> tuple[int, ...]:
        """Candidate exit layers, shallowest first; the last one is where every draft token must stop."""
        if self.exit_layers:
            return self.exit_layers
        return (self.exit_layer or num_layers,)

    def validate_for(self, num_layers: int) -> "Schedule":
        """Raise ScheduleError unless every index fits a model with `num_layers` layers."""
        for name in ("skip_attn", "skip_mlp", *LOWBIT_FIELDS):
            bad = [i for i in getattr(self, name) if not 0 <= i < num_layers]
            _check(
                not bad,
                f"{name} has layer indices {bad} outside [0, {num_layers - 1}] for this {num_layers}-layer model",
            )
        bad = [e for e in self.exits(num_layers) if not 1 <= e <= num_layers]
        _check(not bad, f"exit layers {bad} are outside [1, {num_layers}] for this {num_layers}-layer model")
        if self.max_depth is not None:
            _check(
                self.max_depth >= self.exits(num_layers)[0],
                f"max_depth {self.max_depth} is shallower than every exit {list(self.exits(num_layers))}",
            )
        return self

    def validate_vocab(self, vocab_size: int) -> "Schedule":
        """Raise ScheduleError unless the draft head's tokens fit a vocabulary of `vocab_size`."""
        bad = [t for t in self.head_tokens if t >= vocab_size]
        _check(not bad, f"head_tokens has token ids {bad[:5]} outside this model's vocabulary of {vocab_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data = {"format": FORMAT, **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "Schedule":
        if not isinstance(data, dict):
            raise ScheduleError("a schedule must be a JSON object")
        version = data.get("format")
        if version not in READABLE_FORMATS:
            raise ScheduleError(
                f"schedule format is {version!r}; this selfspec reads {' and '.join(map(repr, READABLE_FORMATS))}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise ScheduleError(f"unknown schedule fields {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in data.items() if k != "format"}
        for name in (*LAYER_FIELDS, "head_tokens"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        if not isinstance(values.get("meta", {}), dict):
            raise ScheduleError("schedule field meta must be an object")
        return cls(**values)

    def to_file(self, path: str | os.PathLike) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Schedule":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ScheduleError(f"cannot read schedule {path}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScheduleError(f"schedule {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_dict(data)

    def with_meta(self, **meta: Any) -> "Schedule":
        return replace(self, meta={**self.meta, **meta})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ScheduleError(message)
