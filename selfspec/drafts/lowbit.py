"""Low-bit draft weights: weight-only int8 (one scale per output channel) or int4 (a scale and a zero per group
of 32 inputs) copies of the model's own matrices, which only the draft reads.

At batch 1 a decode step is bound by the weight bytes it streams, so a draft over a quarter of the bytes costs a
fraction of a step while agreeing with the full model far more often than a shallower draft does. The model's
parameters are never touched. Quantised values are made once per model, dtype and scheme and kept beside the
zoo cache as safetensors (never pickle); which kernel runs them is chosen by timing the candidates on this
device over all the model's matrices in a row, as a decode step streams them. int8 and int4 each have a kernel that
rounds the activations as well (fbgemm's dynamic linear; our own `w4a8`): on a CPU where it wins, the draft agrees
a little less often, and the verify pass, which never runs a low-bit weight, emits the same tokens.
"""

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..cpu import cpu_flags
from ..engine.fused import MATRICES, FusedAdapter, FusedLayer, FusedLinear, layer_linears, stacked
from ..engine.graph_ops import kernel_handle, registered_linear
from ..kernels import w4a8
from ..kernels.timing import best_pass_seconds
from ..paths import cache_root

SCHEMES = ("int8", "int4")
GROUP_SIZE = 32
# Packed draft heads kept, by row set: decoding reuses one; tune scores each candidate with two, ranked on either
# half of its texts (`search.teacher.held_out_rankings`), and tries many sizes.
HEAD_ROW_SETS = 2


@dataclass(frozen=True)
class QuantizedMatrix:
    """A [N, K] matrix as codes and scales, independent of device and compute dtype."""

    scheme: str
    values: torch.Tensor  # int8 [N, K] (int8); uint8 [N, K / 2], two 4-bit codes a byte (int4)
    scales: torch.Tensor  # float32 [N, 1] (int8) or [N, K / GROUP_SIZE] (int4)
    zeros: torch.Tensor | None = None  # float32 [N, K / GROUP_SIZE]: the value code 0 stands for (int4)

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.values.shape
        return rows, width * (2 if self.scheme == "int4" else 1)

    def codes(self) -> torch.Tensor:
        """int32 [N, K]: the codes (int4: 0..15)."""
        if self.scheme == "int8":
            return self.values.to(torch.int32)
        low, high = self.values & 15, self.values >> 4
        return torch.stack([low, high], dim=-1).flatten(1).to(torch.int32)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: the values the codes stand for."""
        if self.scheme == "int8":
            return self.values.float() * self.scales
        rows, width = self.shape
        groups = self.codes().float().view(rows, -1, GROUP_SIZE)
        return (groups * self.scales[..., None] + self.zeros[..., None]).view(rows, width)

    def rows(self, index: torch.Tensor) -> "QuantizedMatrix":
        zeros = None if self.zeros is None else self.zeros[index]
        return QuantizedMatrix(self.scheme, self.values[index], self.scales[index], zeros)


def quantize(weight: torch.Tensor, scheme: str) -> QuantizedMatrix:
    """Round a [N, K] weight to `scheme` (int8: symmetric per row; int4: asymmetric per group of 32)."""
    w = weight.detach().float().cpu()
    if scheme == "int8":
        scales = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-10)  # [N, 1]
        return QuantizedMatrix(scheme, (w / scales).round().clamp(-127, 127).to(torch.int8), scales)
    rows, width = w.shape
    groups = w.view(rows, width // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1), groups.amax(-1)  # [N, K / G]
    scales = ((high - low) / 15).clamp_min(1e-10)
    codes = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).view(rows, width)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [N, K / 2]
    return QuantizedMatrix(scheme, packed, scales, low)


# --- kernels: each turns a quantised matrix into x [M, K] -> x @ W.T [M, N] on a device and dtype ----------


def _int8pack(q: QuantizedMatrix, dtype: torch.dtype, device: torch.device) -> Callable:
    values, scales = q.values.to(device), q.scales[:, 0].to(device, dtype)
    return lambda x: torch._weight_int8pack_mm(x, values, scales)


def _int4pack(q: QuantizedMatrix, dtype: torch.dtype, device: torch.device) -> Callable:
    if device.type != "cpu":
        raise NotImplementedError("the int4 weight-only kernel here is torch's CPU one")
    packed = torch._convert_weight_to_int4pack_for_cpu(q.codes(), 8)
    # the kernel computes (code - 8) * scale + zero, so its zero is the value of code 8
    zeros = q.zeros + 8 * q.scales
    scales_and_zeros = torch.stack([q.scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [K/G, N, 2]
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_and_zeros)


def _fbgemm_dynamic(q: QuantizedMatrix, dtype: torch.dtype, device: torch.device) -> Callable:
    """int8 weights against int8 activations, rounded per call (fbgemm's dynamic linear): integer dot products,
    which on some CPUs stream int8 weights much faster than the weight-only kernel's float ones. Rounding the
    activations too changes only how often the draft agrees, never what the verify pass emits."""
    if device.type != "cpu":
        raise NotImplementedError("fbgemm runs on the CPU")
    # Without VNNI, fbgemm's 8-bit products can saturate 16-bit sums unless activations keep 7 bits
    reduce_range = not {"avx512_vnni", "avx_vnni"} & set(cpu_flags().split())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantised tensors are deprecated; here they only carry codes into fbgemm
        zero_points = torch.zeros(q.shape[0], dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(q.values, q.scales[:, 0].double(), zero_points, 0)
        packed = torch.ops.quantized.linear_prepack(weight, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x.float(), packed, reduce_range).to(dtype)


def _w4a8(q: QuantizedMatrix, dtype: torch.dtype, device: torch.device) -> Callable:
    """int4 codes against activations rounded to int8 per group of 32, in integer dot products (our own C++,
    `w4a8`): on a CPU where unpacking codes to floats costs more than streaming them, it keeps up with the bytes."""
    if device.type != "cpu":
        raise NotImplementedError("the w4a8 kernel runs on the CPU")
    w4a8.load_library()
    packed, scales = w4a8.pack(q.codes(), q.scales, q.zeros)
    return lambda x: w4a8.linear(x, packed, scales, q.shape[0])


def _dequantized(q: QuantizedMatrix, dtype: torch.dtype, device: torch.device) -> Callable:
    """The same rounded values in the compute dtype, through the fused forward's own matrix product."""
    return FusedLinear(q.dequantize().to(device, dtype), None, [q.shape[0]])


KERNELS: dict[str, dict[str, Callable]] = {
    "int8": {"int8pack": _int8pack, "fbgemm-dynamic": _fbgemm_dynamic, "dequantized": _dequantized},
    "int4": {"int4pack": _int4pack, "w4a8": _w4a8, "dequantized": _dequantized},
}
# Kernels that are one op on plain tensors, which a compiled draft calls itself. The others (fbgemm's packed
# params, oneDNN's packed weights) are opaque to tracing: a graph calls them by handle, through Python, some
# 30 µs a call (qwen2.5-coder-0.5b's int4 draft step through w4a8: 96 calls, 25.0 ms by handle, 22.0 traced).
TRACEABLE = {"int8pack", "int4pack", "w4a8"}


# Past this many rows a product is compute-bound, and some weight-only kernels, which unpack the codes for every
# row, fall far behind the same rounded values in the compute dtype; whether the chosen kernel does is timed at
# WIDE_TIMED_ROWS when it is chosen. Only tune's teacher-forced passes get there; drafts run one row.
WIDE_ROWS = 8
WIDE_TIMED_ROWS = 64


class LowbitLinear:
    """`FusedLinear`'s interface over a quantised matrix: one row at a time by the kernel chosen for it, many rows
    by the same kernel where it timed at least as fast there (`runs_wide`), else through a dequantised copy made on
    first need (the size of the exact matrix: on qwen2.5-coder-1.5b, 3.1 GB a scheme)."""

    def __init__(
        self,
        matrix: QuantizedMatrix,
        kernel: str,
        run: Callable,
        bias: torch.Tensor | None,
        sizes: list[int],
        runs_wide: bool = False,
    ):
        self.matrix, self.kernel, self.run, self.bias, self.sizes = matrix, kernel, run, bias, sizes
        self.traceable = kernel in TRACEABLE
        self.runs_wide = runs_wide
        self.wide: FusedLinear | None = None
        self.handle = kernel_handle(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        if torch.compiler.is_compiling() and (not self.traceable or rows.shape[0] > WIDE_ROWS):
            return registered_linear(x, self.handle, sum(self.sizes))  # a compiled draft calls this very object
        if rows.shape[0] > WIDE_ROWS and not self.runs_wide:
            if self.wide is None:
                self.wide = _dequantized(self.matrix, x.dtype, x.device)
            y = self.wide(rows)
        else:
            y = self.run(rows)
        y = y.view(*x.shape[:-1], -1)  # [..., N]
        return y if self.bias is None else y + self.bias

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(self.sizes, dim=-1)


def _pass_seconds(runs: list[Callable], matrices: list[QuantizedMatrix], dtype, device, rows: int = 1) -> float:
    """Best of a few passes over every matrix in a row with `rows`-row inputs (one: the streaming a step does)."""
    inputs = {width: torch.randn(rows, width, dtype=dtype, device=device) for width in {m.shape[1] for m in matrices}}
    return best_pass_seconds([(run, inputs[m.shape[1]]) for run, m in zip(runs, matrices)], device)


@dataclass(frozen=True)
class KernelChoice:
    """The kernel that runs a set of matrices fastest at one row, its runs, and what the timing found."""

    name: str
    runs: list[Callable]
    seconds: dict[str, float]  # every candidate's pass over the matrices at one row
    runs_wide: bool  # the chosen kernel ran WIDE_TIMED_ROWS rows at least as fast as the dequantised values did

    def said(self) -> str:
        """'int4pack (3.6 ms; dequantized 10.4 ms), wide too': what ran, what it beat, and what runs wide inputs."""
        others = "; ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.seconds.items() if k != self.name)
        wide = "wide too" if self.runs_wide else "wide inputs dequantized"
        return f"{self.name} ({self.seconds[self.name] * 1e3:.1f} ms{'; ' + others if others else ''}), {wide}"


def fastest_kernel(matrices: list[QuantizedMatrix], dtype: torch.dtype, device: torch.device) -> KernelChoice:
    """The kernel that runs `matrices` fastest here; whether it also runs wide inputs is timed over the first
    layer's worth of them (or the head) against the dequantised values."""
    timed: dict[str, tuple[float, list[Callable]]] = {}
    for name, build in KERNELS[matrices[0].scheme].items():
        try:
            runs = [build(m, dtype, device) for m in matrices]
            timed[name] = _pass_seconds(runs, matrices, dtype, device), runs
        except (RuntimeError, NotImplementedError):  # a kernel this device, dtype or shape lacks
            continue
    name = min(timed, key=lambda k: timed[k][0])
    sample = slice(0, len(MATRICES))
    wide = {k: _pass_seconds(timed[k][1][sample], matrices[sample], dtype, device, WIDE_TIMED_ROWS)
            for k in {name, "dequantized"} & set(timed)}  # fmt: skip
    runs_wide = name == "dequantized" or wide[name] <= wide.get("dequantized", float("inf"))
    return KernelChoice(name, timed[name][1], {k: v[0] for k, v in timed.items()}, runs_wide)


@dataclass
class DraftWeights:
    """A model's layers and LM head over one low-bit scheme, and the kernels chosen for them."""

    scheme: str
    layers: list[FusedLayer]
    head: QuantizedMatrix
    head_kernel: KernelChoice
    kernels: dict[str, str]  # "layers" / "head" -> what ran, with each candidate's measured pass time
    # packing a head for its kernel takes longer than a decode step (~0.4 s on qwen2.5-coder-0.5b), so it is done
    # for the row sets last used, not at every generate; only the packed kernel is kept, not the dequantised copy a
    # LowbitLinear makes for wide inputs (hundreds of MB in float32), which goes with its draft head
    head_runs: dict[tuple, tuple[QuantizedMatrix, Callable]] = field(default_factory=dict, repr=False)

    def head_linear(self, rows: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> LowbitLinear:
        """The LM head's low-bit matrix, or only its `rows`, run by the kernel chosen for the full head."""
        key = (None if rows is None else tuple(rows.tolist()), dtype, device)
        kernel = self.head_kernel.name
        if key not in self.head_runs:
            while len(self.head_runs) >= HEAD_ROW_SETS:  # the oldest first (dicts keep their order)
                del self.head_runs[next(iter(self.head_runs))]
            matrix = self.head if rows is None else self.head.rows(rows.cpu())
            self.head_runs[key] = matrix, KERNELS[self.scheme][kernel](matrix, dtype, device)
        matrix, run = self.head_runs[key]
        return LowbitLinear(matrix, kernel, run, None, [matrix.shape[0]], self.head_kernel.runs_wide)


def draft_weights(adapter: FusedAdapter, scheme: str) -> DraftWeights:
    """The adapter's model over `scheme`: loaded from the disk cache or quantised (once per process)."""
    if scheme not in adapter.derived:
        adapter.derived[scheme] = _build(adapter, scheme)
    return adapter.derived[scheme]


def _build(adapter: FusedAdapter, scheme: str) -> DraftWeights:
    quantized = _load_or_quantize(adapter, scheme)
    head_weight = adapter.lm_head.weight
    dtype, device = head_weight.dtype, head_weight.device
    names = [(i, name) for i in range(adapter.num_layers) for name in MATRICES]
    chosen = fastest_kernel([quantized[f"layers.{i}.{n}"] for i, n in names], dtype, device)
    by_name = dict(zip(names, chosen.runs))
    layers = []
    for i, base in enumerate(adapter.fused):
        # the exact layer's bias and output sizes; only the matrices change
        linears = {
            n: LowbitLinear(
                quantized[f"layers.{i}.{n}"],
                chosen.name,
                by_name[i, n],
                getattr(base, n).bias,
                getattr(base, n).sizes,
                chosen.runs_wide,
            )  # fmt: skip
            for n in MATRICES
        }
        layers.append(base.with_matrices(**linears))
    head = fastest_kernel([quantized["head"]], dtype, device)
    kernels = {"layers": chosen.said(), "head": head.said()}
    return DraftWeights(scheme, layers, quantized["head"], replace(head, runs=[]), kernels)


def kernels_line(scheme: str, kernels: dict[str, str]) -> str:
    return f"{scheme} kernels here: layers {kernels['layers']}, head {kernels['head']}"


def cache_path(adapter: FusedAdapter, scheme: str) -> Path:
    dtype = str(adapter.lm_head.weight.dtype).removeprefix("torch.")
    return cache_root() / "lowbit" / f"{adapter.fingerprint}-{dtype}-{scheme}-g{GROUP_SIZE}.safetensors"


def _load_or_quantize(adapter: FusedAdapter, scheme: str) -> dict[str, QuantizedMatrix]:
    path = cache_path(adapter, scheme)
    if path.exists():
        try:
            return _unflatten(scheme, load_file(path))
        except (SafetensorError, OSError, KeyError):  # damaged: made again below
            pass
    quantized = {"head": quantize(adapter.lm_head.weight, scheme)}
    for i, layer in enumerate(adapter.layers):
        for name, group in layer_linears(layer).items():
            quantized[f"layers.{i}.{name}"] = quantize(stacked(group)[0], scheme)
    _save(path, quantized)
    return quantized


def _save(path: Path, quantized: dict[str, QuantizedMatrix]) -> None:
    tensors = {}
    for key, q in quantized.items():
        tensors |= {f"{key}.values": q.values, f"{key}.scales": q.scales}
        if q.zeros is not None:
            tensors[f"{key}.zeros"] = q.zeros
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"cannot keep low-bit weights in {path.parent} ({e.strerror or e}): made again next time")
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _unflatten(scheme: str, tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedMatrix]:
    """The matrices a safetensors file holds, each in memory of its own: the file's tensors lie at 32-byte offsets
    in one buffer, and torch's int8 weight-only kernel crashed on such a matrix at 16 input rows."""
    keys = {k.rsplit(".", 1)[0] for k in tensors}

    def own(name: str) -> torch.Tensor | None:
        tensor = tensors.pop(name, None)
        return None if tensor is None else tensor.clone()

    return {k: QuantizedMatrix(scheme, own(f"{k}.values"), own(f"{k}.scales"), own(f"{k}.zeros")) for k in keys}
