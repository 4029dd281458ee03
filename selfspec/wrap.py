"""`selfspec.wrap(model, schedule)`: a drop-in `generate` that drafts with the model itself.

Everything `model.generate` is commonly given is honoured or refused with a clear error; nothing is
silently ignored, because a silently dropped setting would change the output.
"""

import copy
import os
import sys
import warnings
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, StoppingCriteriaList

from .decode.loop import GenerationStats, decode
from .drafts import drafter_for, prepare_drafts
from .engine.cache import PositionedCache
from .engine.compiled import BUCKETS, decode_step
from .engine.fused import FusedAdapter, engine_adapter
from .engine.runner import Runner
from .errors import GenerationInputError, ScheduleError
from .fingerprint import model_fingerprint
from .sampling import Sampler
from .schedule import Schedule, default_for, describe

STEP_ENV = "SELFSPEC_DECODE_STEP"
# generate() arguments that are generation-config fields this engine implements.
CONFIG_KWARGS = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "use_cache", "num_beams", "num_return_sequences",
}  # fmt: skip
# Config fields that change which tokens come out; each must keep its neutral value.
UNSUPPORTED_IF_SET = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "min_length": 0, "min_new_tokens": None, "num_beams": 1, "num_return_sequences": 1, "typical_p": 1.0,
    "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "guidance_scale": None, "watermarking_config": None, "top_h": None, "output_scores": False,
    "output_logits": False, "return_dict_in_generate": False, "assistant_model": None, "prompt_lookup_num_tokens": None,
}  # fmt: skip


def step_mode(backend: str) -> str:
    """How the fused forward runs one-token passes: eager, compiled, or auto (compiled where it measured faster).
    SELFSPEC_DECODE_STEP sets what auto and fused mean (auto, eager or compiled)."""
    if backend in ("eager", "compiled"):
        return backend
    mode = os.environ.get(STEP_ENV, "auto")
    if mode not in ("auto", "eager", "compiled"):
        raise GenerationInputError(f"{STEP_ENV} must be auto, eager or compiled, not {mode!r}")
    return mode


class SpeculativeModel:
    """Wraps a causal LM; `generate` drafts with the model's own shallower self and verifies losslessly."""

    def __init__(
        self, model: PreTrainedModel, schedule: Schedule | None = None, backend: str = "auto", source: str | None = None
    ):
        self._model = model
        self._adapter = engine_adapter(model, backend)
        self._step_mode = step_mode(backend) if isinstance(self._adapter, FusedAdapter) else "eager"
        num_layers = self._adapter.num_layers
        if schedule is None:
            default = default_for(model, num_layers)
            schedule, source = default.schedule, default.source
        self.schedule = schedule.validate_for(num_layers)
        self.schedule.validate_vocab(self._adapter.lm_head.weight.shape[0])
        _check_schedule_target(self.schedule, model)
        prepare_drafts(self._adapter, self.schedule)
        self.schedule_source = source or "given to wrap"
        if source is not None:  # said once it is known to run: a refused schedule is the error's one line alone
            print(f"selfspec: schedule {describe(self.schedule)}: {source}", file=sys.stderr)
        self.last_stats: GenerationStats | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_model"], name)

    def __repr__(self) -> str:
        return f"SpeculativeModel({type(self._model).__name__}, {self.schedule!r})"

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        input_ids = _pop_input_ids(input_ids, kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        streamer = kwargs.pop("streamer", None)
        stopping = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        config = self._config(kwargs)
        prompts = _prompts(input_ids, attention_mask)
        if streamer is not None and len(prompts) > 1:
            raise GenerationInputError("streamer supports batch size 1 only, as in model.generate")
        max_new = _max_new_tokens(config, input_ids.shape[1])
        self._check_length(prompts, max_new)
        eos_list = _as_list(config.eos_token_id)
        eos = set(eos_list)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos_list or [0])[0]
        sampler = Sampler(config.do_sample is True, config.temperature, config.top_k, config.top_p)

        if streamer is not None:
            streamer.put(input_ids.cpu())
        total = GenerationStats()
        outputs = []
        for row, prompt in enumerate(prompts):
            generated: list[int] = []
            prefix = input_ids[row : row + 1]

            def emit(token: int) -> bool:
                generated.append(token)
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
                if not stopping:
                    return False
                sequence = torch.cat([prefix, torch.tensor([generated], device=prefix.device)], dim=1)
                return bool(stopping(sequence, None).all())

            total.merge(self._decode_one(prompt, max_new, sampler, eos, emit))
            outputs.append(generated)
        if streamer is not None:
            streamer.end()
        self.last_stats = total
        return _assemble(input_ids, outputs, pad)

    def _decode_one(self, prompt: list[int], max_new: int, sampler: Sampler, eos: set[int], emit) -> GenerationStats:
        schedule = self.schedule
        # A round never writes past the last position generated, so the prompt plus max_new suffices; a compiled
        # pass padded to its bucket writes up to a bucket further.
        compiled = decode_step(self._adapter, self._step_mode, schedule.max_verify_width)
        room = BUCKETS[-1] if compiled is not None else 0
        cache = PositionedCache(self._adapter.num_layers, len(prompt) + max_new + room)
        if compiled is not None:
            cache.allocate(self._model.config, self._adapter.lm_head.weight.dtype, self._adapter.lm_head.weight.device)
        runner = Runner(self._adapter, cache, compiled)
        return decode(runner, drafter_for(runner, schedule), prompt, max_new, sampler, eos, emit)

    def _config(self, kwargs: dict[str, Any]) -> GenerationConfig:
        config = kwargs.pop("generation_config", None)
        config = copy.deepcopy(config if config is not None else self._model.generation_config)
        unknown = sorted(set(kwargs) - CONFIG_KWARGS - set(UNSUPPORTED_IF_SET))
        if unknown:
            raise GenerationInputError(f"generate() argument(s) not supported by selfspec: {', '.join(unknown)}")
        try:
            config.update(**kwargs)
        except ValueError as e:  # transformers validates the merged config
            raise GenerationInputError(str(e).replace("`", "")) from None
        for name, neutral in UNSUPPORTED_IF_SET.items():
            value = getattr(config, name, neutral)
            if value is not None and value != neutral:
                raise GenerationInputError(f"generation setting {name}={value!r} is not supported by selfspec")
        if config.use_cache is False:
            raise GenerationInputError("use_cache=False is not supported: the engine is built on its KV cache")
        return config

    def _check_length(self, prompts: list[list[int]], max_new: int) -> None:
        limit = getattr(self._model.config, "max_position_embeddings", None)
        longest = max(len(p) for p in prompts)
        if limit is not None and longest + max_new > limit:
            raise GenerationInputError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new}) exceeds the model's context of {limit}"
            )


def _check_schedule_target(schedule: Schedule, model: PreTrainedModel) -> None:
    """A schedule tuned for another model is an error; for another dtype or device, a warning."""
    recorded = schedule.meta.get("model") or {}
    if recorded.get("fingerprint") and recorded["fingerprint"] != model_fingerprint(model):
        raise ScheduleError(
            f"this schedule was tuned for {recorded.get('name', 'another model')} (fingerprint "
            f"{recorded['fingerprint']}), not for this model; run `selfspec tune` for this model"
        )
    for key, actual in (("dtype", str(model.dtype).removeprefix("torch.")), ("device", model.device.type)):
        wanted = schedule.meta.get(key)
        if wanted and wanted != actual:
            warnings.warn(f"schedule was tuned for {key} {wanted}, running on {actual}: speed may differ", stacklevel=3)


def wrap(
    model: PreTrainedModel, schedule: Schedule | None = None, backend: str = "auto", source: str | None = None
) -> SpeculativeModel:
    """Wrap `model` for self-speculative generation.

    schedule None: what `selfspec tune` recorded for this model, dtype and machine, else the built-in default
    (`selfspec.schedule.default`); stderr says which, and `.schedule_source` keeps it. source: where a given
    schedule came from (a file, a name), said on stderr the same way; a schedule given without one is not announced.

    backend: "fused" runs derived fused copies of the weights (`selfspec.fused`), "reference" the model's own
    modules; "auto" takes fused where the architecture allows it. The fused forward's one-token step is compiled
    where that measured faster on this machine (`selfspec.compiled`); "eager" never compiles it, "compiled"
    always does.
    """
    return SpeculativeModel(model, schedule, backend, source)


def unwrap(model: Any) -> PreTrainedModel:
    """The model inside a wrapper (or the model itself)."""
    return model._model if isinstance(model, SpeculativeModel) else model


def _pop_input_ids(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None:
        input_ids = kwargs.pop("input_ids", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise GenerationInputError("input_ids must be a [batch, length] tensor of token ids")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise GenerationInputError("the prompt is empty: give at least one token")
    return input_ids


def _prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's real tokens; padding must be on the left, as decoder-only generation requires."""
    if attention_mask is None:
        return input_ids.tolist()
    if attention_mask.shape != input_ids.shape:
        raise GenerationInputError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    prompts = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        real = sum(mask)
        if real == 0:
            raise GenerationInputError("a row of attention_mask is all zeros: that prompt is empty")
        if mask != [0] * (len(mask) - real) + [1] * real:
            raise GenerationInputError(
                "attention_mask must be left padding (zeros, then ones); set tokenizer.padding_side='left'"
            )
        prompts.append(ids[len(mask) - real :])
    return prompts


def _max_new_tokens(config: GenerationConfig, prompt_length: int) -> int:
    max_new = config.max_new_tokens
    if max_new is None:
        max_new = (config.max_length or 20) - prompt_length
    if max_new <= 0:
        raise GenerationInputError(f"max_new_tokens must be >= 1 (got {max_new})")
    return max_new


def _as_list(token_ids: int | list[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def _assemble(input_ids: torch.Tensor, outputs: list[list[int]], pad: int) -> torch.Tensor:
    """[B, T + longest] like generate: each row's new tokens, finished rows padded on the right."""
    longest = max(len(o) for o in outputs)
    new = torch.full((len(outputs), longest), pad, dtype=input_ids.dtype)
    for row, tokens in enumerate(outputs):
        new[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
