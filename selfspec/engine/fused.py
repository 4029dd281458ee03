"""The engine's fast forward: the same layers run over derived, fused copies of the weights.

Each layer's q/k/v projections become one matrix and gate/up another, so a layer runs 4 matrix products
instead of 7; where the CPU has bfloat16 instructions the matrices are also re-laid out once for oneDNN's
packed kernels, which at batch 1 stream the weights faster than `F.linear`, and where it measured faster still,
for our few-row kernel (`bf16_gemv`) too (`selfspec bench` shows the plain loop on each forward next to
`model.generate`). The model's parameters
are never touched: stacked and re-laid-out matrices are copies (a lone matrix such as `o_proj`, where not
re-laid out, is read in place), built once per model, dtype and device (so weights changed in place after that
are not all seen: wrap the model again, or use `backend="reference"`).

What a layer computes around its products is its family's (`families/`: llama, mistral, qwen2, qwen3, gemma,
gemma 3); a config the family cannot compute (another activation, soft-capped attention), and `backend="reference"`,
run the model's own modules through `Adapter`.
"""

import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..cpu import packed_bf16
from ..errors import GenerationInputError, UnsupportedModelError
from ..fingerprint import model_fingerprint
from ..kernels import bf16_gemv
from .adapter import Adapter, adapter_for
from .families import Llama
from .graph_ops import kernel_handle, registered_linear
from .span import Span

# auto and fused: the fused forward, its one-token step compiled where that measured faster (`selfspec.engine.compiled`);
# eager: the fused forward, never compiled; compiled: always compiled; reference: the model's own modules.
BACKENDS = ("auto", "fused", "eager", "compiled", "reference")

# model -> {(dtype, device): the fused adapter built for them}
_built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FusedLinear:
    """Several linear layers that read the same input, as one matrix product over their stacked weights.

    few_rows > 0 also lays the matrix out for our few-row bf16 kernel (`bf16_gemv`) where it can run, which then
    takes inputs of up to `few_rows` rows; the adapter lowers that to what it measured faster (`use_few_rows`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], few_rows: int = 0):
        self.bias = bias
        self.sizes = sizes
        self.in_features = weight.shape[1]
        self.packed = _packs(weight)
        few = few_rows and weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and bf16_gemv.wanted()
        self.gemv = bf16_gemv.Gemv(weight, bias) if few else None
        self.few_rows = few_rows if self.gemv else 0
        # oneDNN's packed layout is opaque; the plain copy is dropped once packed
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight
        self.handle = kernel_handle(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.few_rows * x.shape[-1]:
            return self.gemv(x)  # one op on a handle: a compiled graph calls it itself
        if torch.compiler.is_compiling():
            return registered_linear(x, self.handle, sum(self.sizes))
        return self.wide(x)

    def wide(self, x: torch.Tensor) -> torch.Tensor:
        """The product by oneDNN's packed kernel, or `F.linear` (float32, or no packed kernels here); by the few-row
        kernel where it serves every width (and the other copy is gone)."""
        if self.weight is None:
            return self.gemv(x)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def use_few_rows(self, rows: int) -> None:
        """Run inputs of up to `rows` rows by the few-row kernel (0: never, and its copy of the weights goes;
        `bf16_gemv.EVERY_ROW`: every input, and the other kernel's copy goes)."""
        self.few_rows = rows if self.gemv else 0
        if not self.few_rows:
            self.gemv = None
        elif rows == bf16_gemv.EVERY_ROW:
            self.weight = None

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(self.sizes, dim=-1)

    @classmethod
    def stacking(cls, layers: list[nn.Linear], few_rows: int = 0) -> "FusedLinear":
        weight, bias = stacked(layers)
        return cls(weight, bias, [layer.out_features for layer in layers], few_rows)


def stacked(layers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layers' weights stacked into one [sum of N, K] matrix, and their biases likewise (or None). A single
    layer's weight is its own (no copy: it is only read, and a float32 model would otherwise be held twice)."""
    if len(layers) == 1:
        bias = layers[0].bias
        return layers[0].weight.detach(), None if bias is None else bias.detach()
    weight = torch.cat([layer.weight.detach() for layer in layers])
    biases = [layer.bias for layer in layers]
    return weight, None if biases[0] is None else torch.cat([b.detach() for b in biases])


def _packs(weight: torch.Tensor) -> bool:
    """oneDNN's packed bf16 kernels only: float32 keeps `F.linear`, the very kernel `model.generate` runs."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and packed_bf16()


# A layer's matrices as the fused forward runs them: q/k/v stacked, o, gate/up stacked, down.
MATRICES = ("qkv", "o", "gate_up", "down")


def layer_linears(layer: nn.Module) -> dict[str, list[nn.Linear]]:
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "qkv": [attn.q_proj, attn.k_proj, attn.v_proj],
        "o": [attn.o_proj],
        "gate_up": [mlp.gate_proj, mlp.up_proj],
        "down": [mlp.down_proj],
    }


@dataclass(frozen=True)
class FusedLayer:
    """One layer's matrices, its own norm modules (by their names in the model: `input_layernorm`, `q_norm`, ...) and
    attention settings; a draft may run the same layer over derived (low-bit) matrices."""

    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear
    norms: dict[str, nn.Module]
    scaling: float
    head_dim: int
    window: int | None  # the sliding window it attends over (None: every earlier position)
    rope_key: str | None  # which of the family's rotary embeddings it rotates by

    @classmethod
    def of(cls, layer: nn.Module, i: int, family: Llama, few_rows: int = 0) -> "FusedLayer":
        linears = {name: FusedLinear.stacking(group, few_rows) for name, group in layer_linears(layer).items()}
        attn = layer.self_attn
        norms = {name: module for part in (layer, attn) for name, module in part.named_children() if "norm" in name}
        return cls(**linears, norms=norms, scaling=attn.scaling, head_dim=attn.head_dim, window=family.window(i),
                   rope_key=family.rope_key(i))  # fmt: skip

    def with_matrices(self, **matrices) -> "FusedLayer":
        return replace(self, **matrices)


class FusedAdapter(Adapter):
    """`Adapter`'s interface over fused weights; attention is always SDPA."""

    def __post_init__(self, model: PreTrainedModel) -> None:
        super().__post_init__(model)
        self.fingerprint = model_fingerprint(model)  # names the derived weights and timings kept on disk
        self.attn_implementation = "sdpa"
        few_rows = bf16_gemv.TIMED_ROWS[-1]  # until timed below
        self.fused = [FusedLayer.of(layer, i, self.family, few_rows) for i, layer in enumerate(self.layers)]
        self.head = FusedLinear.stacking([self.lm_head], few_rows)
        self.few_rows_line = self._choose_few_rows()
        self.derived: dict = {}  # low-bit draft weights built for this adapter, by scheme (`selfspec.drafts.lowbit`)

    def _choose_few_rows(self) -> str:
        """Time our few-row kernel against oneDNN's over every matrix, keep it where it won, and say so."""
        linears = [getattr(layer, name) for layer in self.fused for name in MATRICES] + [self.head]
        if not any(linear.gemv for linear in linears):
            return ""
        other = "oneDNN's" if self.head.packed else "F.linear"
        products = [(linear.gemv, linear.wide, linear.in_features) for linear in linears]
        rows, times = bf16_gemv.rows_it_wins(products)
        for linear in linears:
            linear.use_few_rows(rows)
        timed = "; ".join(f"{m} row{'s' * (m > 1)} {ours * 1e3:.1f} ms against {theirs * 1e3:.1f}"
                          for m, (ours, theirs) in times.items())  # fmt: skip
        if rows == bf16_gemv.EVERY_ROW:
            chosen = f"every width, {other} copy of the weights dropped"
        else:
            chosen = f"up to {rows} row{'s' * (rows > 1)}" if rows else "never"
        sampled = (
            f" (the {bf16_gemv.PROMPT_ROWS}-row figure: the first layer's)" if bf16_gemv.PROMPT_ROWS in times else ""
        )
        return (
            f"bf16 few-row kernel ({bf16_gemv.isa()}): {chosen} (every matrix, ours against {other}: {timed}{sampled})"
        )

    @property
    def few_rows(self) -> int:
        """Up to how many input rows the exact matrices run by the few-row kernel (0: never)."""
        return self.head.few_rows

    def attention(self, i: int, h: torch.Tensor, span: Span, cache, weights: FusedLayer | None = None) -> torch.Tensor:
        return self.family.attention(weights or self.fused[i], i, h, span, cache)

    def mlp(self, i: int, h: torch.Tensor, weights: FusedLayer | None = None) -> torch.Tensor:
        return self.family.mlp(weights or self.fused[i], h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.family.logits(self.head, self.final_norm, h)  # [B, T, V]


def engine_adapter(model: PreTrainedModel, backend: str = "auto") -> Adapter:
    """The adapter the engine runs `model` with: fused where the family allows it (auto), or as asked."""
    if backend not in BACKENDS:
        raise GenerationInputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    reference = adapter_for(model)
    unfusable = reference.family.unfusable()
    if backend == "reference" or (backend == "auto" and unfusable):
        return reference
    if unfusable:
        raise UnsupportedModelError(f"the fused backend does not compute {unfusable}; use backend='reference'")
    built = _built.setdefault(model, {})
    key = (model.dtype, model.device)
    if key not in built:
        built[key] = FusedAdapter(model, reference.family)
    return built[key]


def path_line(adapter: Adapter) -> str:
    """Which forward the engine runs for this adapter's model, and why, for bench's and tune's output."""
    family = f"{type(adapter.family).__name__.lower()}'s layer ({adapter.config.model_type})"
    if isinstance(adapter, FusedAdapter):
        return f"engine: the fused forward, {family}"
    unfusable = adapter.family.unfusable()
    why = f"the fused forward does not compute {unfusable}" if unfusable else "backend='reference'"
    return f"engine: the model's own modules, {family}: {why}"
