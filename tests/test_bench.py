"""`selfspec bench`: the floor's arithmetic, and a tiny real run on smollm2-135m with the profile."""

import json

import pytest
import torch
from click.testing import CliRunner
from selfspec.evals import bench
from selfspec.evals.bench import bench_command
from selfspec.evals.floor import floor_seconds_per_token, read_bandwidth, step_weight_bytes

from selfspec import Schedule


def test_step_weight_bytes_counts_layers_norm_and_head_once(smollm2_fp32):
    model, _ = smollm2_fp32
    inner = model.model
    layers = sum(p.numel() for p in inner.layers.parameters())
    expected = 4 * (layers + inner.norm.weight.numel() + model.lm_head.weight.numel())
    assert step_weight_bytes(model) == expected
    # smollm2 ties its head to the embedding: one 49152 x 576 matrix, counted as the head only
    assert model.lm_head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr()


def test_floor_is_weights_over_measured_bandwidth(smollm2_fp32):
    model, _ = smollm2_fp32
    bandwidth = read_bandwidth(repeats=2, nbytes=1 << 26)
    assert 1e8 < bandwidth < 1e13  # bytes/s: anything outside is a timing bug, not a machine
    assert floor_seconds_per_token(model, bandwidth) == pytest.approx(step_weight_bytes(model) / bandwidth)


@pytest.fixture(scope="module")
def model_loads(smollm2_fp32):
    def load(name: str, dtype: str, trust_remote_code: bool = False):
        assert (name, dtype) == ("smollm2-135m", "float32")
        return smollm2_fp32

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "load_model", load)
        yield
    torch.set_num_threads(threads)


def test_bench_times_every_loop_and_profiles_draft_and_verify(model_loads, tmp_path):
    schedule = tmp_path / "s.json"
    Schedule(exit_layer=20, max_draft=3, anneal=1.0, confidence=0.3).to_file(schedule)
    out = tmp_path / "bench.json"
    args = ["smollm2-135m", "--schedule", str(schedule), "--limit", "1", "--categories", "essay"]
    args += ["--max-new-tokens", "8", "--dtype", "float32", "--threads", "1", "--profile", "--out", str(out)]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    names = [m["name"] for m in figures["methods"]]
    assert names == ["generate", "plain·reference", "plain·eager", "plain·compiled", "speculation"]
    for method in figures["methods"]:
        assert method["prompts"] == 1 and method["tokens"] == 8 and method["ms_per_token"] > 0
        assert method["identical"] == 1, method  # float32: every loop gives generate's tokens
    assert figures["floor_ms_per_token"] > 0 and "floor" in result.output
    assert figures["layer_draft"]["decode_speedup"] > 0 and "of the bound" in result.output
    # the profile splits the speculating loop's time between its draft steps and verify passes
    assert "speculation: selfspec.draft" in result.output and "speculation: selfspec.verify" in result.output
    assert "aten::" in result.output


def test_bench_passes_prices_every_verify_width_against_the_step(model_loads, tmp_path):
    out = tmp_path / "passes.json"
    args = ["smollm2-135m", "--passes", "--schedule", "early-exit", "--limit", "1", "--categories", "essay"]
    args += ["--dtype", "float32", "--threads", "1", "--out", str(out)]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert list(figures["passes"]) == ["1", "2", "4", "6", "8", "12", "16"]
    assert all(ms > 0 for ms in figures["passes"].values()) and figures["step_ms"] == figures["passes"]["1"]
    assert 0 < figures["draft_ms"] and 0 < figures["draft_bytes"] < figures["step_bytes"]  # exits at layer 22 of 30
    assert figures["read_bandwidth_gbs"] > 0 and figures["peak_gflops"] > 0
    assert all(d["kernel"] == "F.linear" for d in figures["details"])  # float32
    assert "width 16" in result.output and "layer draft step" in result.output and "cpu: " in result.output


def test_bench_refuses_bad_arguments_before_loading(tmp_path):
    result = CliRunner().invoke(bench_command, ["smollm2-135m", "--dtype", "float64"])
    assert result.exit_code != 0 and "dtype" in str(result.exception or result.output)
    result = CliRunner().invoke(bench_command, ["smollm2-135m", "--prompts", str(tmp_path / "missing.jsonl")])
    assert result.exit_code != 0 and "missing.jsonl" in str(result.exception or result.output)
