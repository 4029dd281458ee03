"""Shared fixtures: real zoo models, built into the selfspec cache on first use."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from selfspec.engine import compiled
from selfspec.zoo import load_model

# CI runners and the dev box have 2 cores; more threads only adds contention. The suite runs in two pytest-xdist
# workers (most of its time is compiling, which takes one core), so each worker computes on one.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
# Tests that want the compiled one-token step ask for it (backend="compiled"); elsewhere the step stays eager, so
# no test pays a compile it does not test, and tune's and eval's tests time the same step on every machine.
os.environ.setdefault("SELFSPEC_DECODE_STEP", "eager")
# The suite's tune runs record schedules like any tune; kept apart from the machine's own records, a test never runs
# another test's tuned schedule where it asked for the default (and a developer's own tune is never overwritten).
os.environ["SELFSPEC_SCHEDULES"] = tempfile.mkdtemp(prefix="selfspec-test-schedules-")
atexit.register(shutil.rmtree, os.environ["SELFSPEC_SCHEDULES"], ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_fp32():
    """(model, tokenizer) for smollm2-135m in float32."""
    return load_model("smollm2-135m", "float32")


@pytest.fixture(scope="session")
def qwen05_fp32():
    """(model, tokenizer) for qwen2.5-coder-0.5b in float32."""
    return load_model("qwen2.5-coder-0.5b", "float32")


@pytest.fixture(scope="session")
def gemma3_fp32():
    """(model, tokenizer) for gemma3-270m in float32."""
    return load_model("gemma3-270m", "float32")


@pytest.fixture
def eager_drafts(monkeypatch):
    """Compiled full-depth passes, eager draft layers: a float32 graph per random draft plan would take ~40 s each;
    the compiled draft layers are tested on every fused family (test_compiled)."""
    monkeypatch.setattr(compiled.CompiledPasses, "draft_segment", lambda self, plan, first, stop: None)
