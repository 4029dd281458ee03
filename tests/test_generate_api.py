"""fast.generate honours what users pass to model.generate, and refuses clearly what it cannot honour."""

import pytest
import torch
from transformers import StopStringCriteria, TextStreamer

import selfspec

SCHEDULE = selfspec.Schedule(exit_layer=24, max_draft=4, anneal=1.0, confidence=0.3)


@pytest.fixture
def prompt(smollm2_fp32):
    _, tokenizer = smollm2_fp32
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )  # fmt: skip


def test_streamer_prints_what_is_generated(smollm2_fp32, prompt, capsys):
    model, tokenizer = smollm2_fp32
    fast = selfspec.wrap(model, SCHEDULE)
    out = fast.generate(**prompt, max_new_tokens=20, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    new_text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert printed.strip() == new_text.strip() and printed.strip()


def test_stopping_criteria_and_eos_override_match_generate(smollm2_fp32, prompt):
    model, tokenizer = smollm2_fp32
    fast = selfspec.wrap(model, SCHEDULE)
    stop = lambda: [StopStringCriteria(tokenizer, [","])]  # noqa: E731 - a fresh criterion per call
    expected = model.generate(**prompt, max_new_tokens=40, do_sample=False, stopping_criteria=stop())
    assert torch.equal(fast.generate(**prompt, max_new_tokens=40, stopping_criteria=stop()), expected)
    comma = tokenizer.convert_tokens_to_ids(",")
    expected = model.generate(**prompt, max_new_tokens=40, do_sample=False, eos_token_id=comma)
    assert torch.equal(fast.generate(**prompt, max_new_tokens=40, eos_token_id=comma), expected)


def test_max_length_and_attribute_forwarding(smollm2_fp32, prompt):
    model, _ = smollm2_fp32
    fast = selfspec.wrap(model, SCHEDULE)
    length = prompt["input_ids"].shape[1] + 7
    assert torch.equal(fast.generate(**prompt, max_length=length), model.generate(**prompt, max_length=length))
    assert fast.config is model.config and fast.device == model.device


def test_last_stats_are_consistent(smollm2_fp32, prompt):
    model, _ = smollm2_fp32
    fast = selfspec.wrap(model, SCHEDULE)
    fast.generate(**prompt, max_new_tokens=16)
    stats = fast.last_stats
    assert stats.new_tokens == sum(n * c for n, c in stats.accepted_lengths.items())
    assert stats.rounds == sum(stats.stop_reasons.values()) == sum(stats.accepted_lengths.values())
    assert 0 <= stats.accepted <= stats.drafted and stats.tokens_per_second > 0
    assert set(stats.as_dict()) >= {"mean_accepted_length", "acceptance_rate", "tokens_per_second", "stop_reasons"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be greater than 0"),
        (dict(repetition_penalty=1.2), "repetition_penalty"),
        (dict(num_beams=2), "num_beams"),
        (dict(do_sample=True, temperature=0.0), "temperature > 0"),
        (dict(output_attentions=True), "not supported by selfspec: output_attentions"),
        (dict(use_cache=False), "use_cache=False"),
    ],
)
def test_unsupported_or_bad_arguments_are_refused(smollm2_fp32, prompt, kwargs, message):
    model, _ = smollm2_fp32
    with pytest.raises(selfspec.GenerationInputError, match=message):
        selfspec.wrap(model, SCHEDULE).generate(**prompt, **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts_are_refused(smollm2_fp32):
    model, _ = smollm2_fp32
    fast = selfspec.wrap(model, SCHEDULE)
    with pytest.raises(selfspec.GenerationInputError, match="empty"):
        fast.generate(torch.zeros((1, 0), dtype=torch.long), max_new_tokens=4)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(selfspec.GenerationInputError, match="left padding"):
        fast.generate(ids, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), max_new_tokens=4)
    with pytest.raises(selfspec.GenerationInputError, match="batch size 1"):
        fast.generate(ids, max_new_tokens=4, streamer=TextStreamer(None))
