"""Our few-row bfloat16 kernel: a float32 sum rounded once, at every row count and ragged shape; the fused forward
runs it only up to the rows it measured faster, and a compiled graph calls it without a Python frame."""

import gc
import os
import subprocess
import sys

import pytest
import torch
from test_architectures import tiny

from selfspec.cpu import cpu_flags
from selfspec.engine.fused import FusedLinear, engine_adapter
from selfspec.kernels import bf16_gemv, native

pytestmark = pytest.mark.skipif(not bf16_gemv.available(), reason="needs AVX-512 bf16 or AVX2, and a compiler")

ROWS, WIDTH = 37, 70  # rows not a multiple of the 16-row block, and an odd number of input pairs


def ragged(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(ROWS, WIDTH, generator=generator).bfloat16(), torch.randn(ROWS, generator=generator).bfloat16()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17])
def test_products_are_float32_sums_rounded_once(rows):
    weight, bias = ragged(rows)
    x = torch.randn(2, rows, WIDTH, generator=torch.Generator().manual_seed(7)).bfloat16()  # [2, rows, K]
    for b in (None, bias):
        out = bf16_gemv.Gemv(weight, b)(x)
        exact = x.double() @ weight.double().T + (0 if b is None else b.double())
        assert out.shape == (2, rows, ROWS) and out.dtype == torch.bfloat16
        # half a bfloat16 step (2^-8 relative) from the exact sum, plus float32's own rounding of it
        assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all()


def test_a_rows_product_is_the_same_whatever_the_width():
    """Row-invariant: a row's sums run in the same order alone or in a pass of any width, so a verify pass gives a
    row the same bits as a one-token step."""
    weight, bias = ragged(5)
    gemv = bf16_gemv.Gemv(weight, bias)
    x = torch.randn(1, 17, WIDTH, generator=torch.Generator().manual_seed(8)).bfloat16()
    wide = gemv(x)
    for rows in (1, 2, 3, 8, 9, 16):
        assert torch.equal(gemv(x[:, :rows]), wide[:, :rows]), rows
    assert all(torch.equal(gemv(x[:, i : i + 1]), wide[:, i : i + 1]) for i in range(17))


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next():
    """torch's build baton is a file; a process killed while holding it leaves it, and the next one waited forever."""
    build = native.build_directory("bf16_gemv")
    (build / "lock").touch()
    check = "from selfspec.kernels import native; print(repr(native.built('bf16_gemv')))"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "''", run.stderr[-2000:]
    assert not (build / "lock").exists()


def test_a_released_matrix_is_gone():
    weight, _ = ragged(0)
    gemv = bf16_gemv.Gemv(weight, None)
    handle = gemv.handle
    del gemv
    gc.collect()
    with pytest.raises(RuntimeError, match=f"no matrix {handle}"):
        torch.ops.selfspec_bf16.gemv(torch.zeros(1, WIDTH, dtype=torch.bfloat16), handle, ROWS)


def test_the_fused_product_takes_it_up_to_its_rows_only():
    weight, bias = ragged(1)
    linear = FusedLinear(weight, bias, [ROWS], few_rows=2)
    for rows in (1, 2, 3):
        x = torch.randn(1, rows, WIDTH).bfloat16()
        expected = linear.gemv(x) if rows <= 2 else linear.wide(x)
        assert torch.equal(linear(x), expected), rows
    linear.use_few_rows(0)
    assert linear.gemv is None and linear(x[:, :1]).shape == (1, 1, ROWS)


def test_it_can_be_kept_off(monkeypatch):
    monkeypatch.setenv(bf16_gemv.ENABLED_ENV, "0")
    weight, bias = ragged(4)
    linear = FusedLinear(weight, bias, [ROWS], few_rows=4)
    assert linear.gemv is None and linear.few_rows == 0


def test_a_compiled_graph_calls_the_kernel_itself():
    weight, bias = ragged(2)
    linear = FusedLinear(weight, bias, [ROWS], few_rows=1)
    traced = []

    def recording(graph, inputs):
        traced.extend(node.target for node in graph.graph.nodes)
        return graph.forward

    x = torch.randn(1, 1, WIDTH).bfloat16()
    torch.compile(lambda t: linear(t) * 2, backend=recording, fullgraph=True)(x)
    assert torch.ops.selfspec_bf16.gemv in traced and torch.ops.selfspec.linear not in traced
    compiled = torch.compile(lambda t: linear(t) * 2, fullgraph=True)
    assert torch.equal(compiled(x), linear.gemv(x) * 2)


def test_it_is_kept_only_for_the_rows_it_measured_faster():
    weight, _ = ragged(3)
    linear = FusedLinear(weight, None, [ROWS], few_rows=4)

    def twice(x: torch.Tensor) -> torch.Tensor:
        linear.wide(x)
        return linear.wide(x)

    assert bf16_gemv.rows_it_wins([(twice, linear.wide, WIDTH)])[0] == 0
    rows, times = bf16_gemv.rows_it_wins([(linear.wide, twice, WIDTH)])  # faster at every width, prompts too
    assert rows == bf16_gemv.EVERY_ROW and all(ours < theirs for ours, theirs in times.values())
    assert sorted(times) == [*bf16_gemv.TIMED_ROWS, bf16_gemv.PROMPT_ROWS]


def test_serving_every_width_it_drops_the_other_copy():
    weight, bias = ragged(5)
    linear = FusedLinear(weight, bias, [ROWS], few_rows=4)
    linear.use_few_rows(bf16_gemv.EVERY_ROW)
    assert linear.weight is None
    x = torch.randn(1, 200, WIDTH).bfloat16()  # a prompt's width
    assert torch.equal(linear(x), linear.gemv(x)) and torch.equal(linear.wide(x), linear.gemv(x))


def test_an_adapter_runs_every_matrix_by_the_rows_it_chose():
    adapter = engine_adapter(tiny("qwen2").to(torch.bfloat16))
    linears = [getattr(layer, name) for layer in adapter.fused for name in ("qkv", "o", "gate_up", "down")]
    assert adapter.few_rows in (0, *bf16_gemv.TIMED_ROWS, bf16_gemv.EVERY_ROW)
    assert all(linear.few_rows == adapter.few_rows for linear in linears + [adapter.head])
    assert adapter.few_rows_line.startswith(f"bf16 few-row kernel ({bf16_gemv.isa()}): ")


@pytest.mark.skipif("avx512_bf16" not in cpu_flags().split(), reason="the AVX-512 build runs here natively")
def test_the_avx2_build_runs_where_torch_runs_avx2_and_gives_the_same_sums(tmp_path):
    """A CPU without AVX-512 runs the kernel's AVX2 code: built here as torch's AVX2 kernels are chosen."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # the child's own, as from a shell
    env |= {"ATEN_CPU_CAPABILITY": "avx2", "SELFSPEC_CACHE": str(tmp_path)}
    tests = [
        "-k",
        "products or whatever_the_width or released or takes_it or compiled_graph",
        "-p",
        "no:cacheprovider",
        "-n",
        "0",
    ]
    said = "import os; from selfspec.kernels import bf16_gemv; bf16_gemv.available(); print(bf16_gemv.isa(), os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    isa = subprocess.run([sys.executable, "-c", said], env=env, capture_output=True, text=True)
    # and graphs compiled at AVX2 kept apart from those compiled at AVX-512
    assert isa.stdout.split() == ["avx2", str(tmp_path / "inductor-avx2")], isa.stderr
    run = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", *tests], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and "15 passed," in run.stdout, run.stdout[-2000:]
