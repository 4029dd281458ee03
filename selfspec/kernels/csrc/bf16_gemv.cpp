// The exact bfloat16 matrix product for one to a few input rows: what a decode step, a draft step and a short
// verify pass run.
//
// Why: oneDNN's packed kernels are built for wide inputs; at one row they stream the weights at ~22 GB/s on a
// two-core Xeon whose memory reads at ~31 (qwen2.5-coder-0.5b's layers: 31.5 ms), and a decode step is nothing but
// that stream; a CPU without AVX-512 has no packed kernels at all and runs F.linear. Here each 64-byte load of
// weights is one AVX-512 bf16 dot-product instruction per input row (or, with AVX2 only, a shift, a mask and two
// FMAs per 32 bytes), the next weights are prefetched ahead of use, and the weights sit in 2 MB pages (with 4 KB
// pages the TLB misses slowed the LM head's stream by 18%), so the product runs at the speed memory delivers.
//
// Weight layout (made by register_matrix): rows in blocks of 16, one row per 32-bit lane: for a block and inputs
// 2p, 2p+1, 64 bytes where lane r holds row r's two weights. One block is [K / 2, 16, 2] bfloat16.
//
// The matrices live in a registry and graphs name them by number: a compiled step then calls this op without
// holding weights (see selfspec/graph_ops.py) and without a Python frame per product.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kRows = 16;                // output rows per block
constexpr int64_t kPrefetchBytes = 1024;     // how far ahead of the weights in use to ask for the next ones
constexpr int64_t kHugePage = int64_t{2} << 20;

struct Matrix {
  at::Tensor blocks;  // bfloat16 [N' / 16, K / 2, 16, 2], N' the rows padded to a block
  at::Tensor bias;    // float32 [N'] or undefined
  int64_t rows = 0;   // N
};

std::mutex registry_lock;
std::vector<Matrix> registry;  // by handle; a released handle keeps its slot, empty

// A buffer in transparent huge pages where the kernel allows them (asked before the first write, which is when
// the kernel picks the page size), freed with the tensor.
at::Tensor huge_page_tensor(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t bytes = at::elementSize(dtype);
  for (int64_t s : sizes) bytes *= s;
  bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* memory = nullptr;
  TORCH_CHECK(posix_memalign(&memory, kHugePage, bytes) == 0, "bf16_gemv: out of memory");
  madvise(memory, bytes, MADV_HUGEPAGE);  // advice only: without it the buffer is still correct
  return at::from_blob(memory, sizes, [](void* p) { std::free(p); }, at::TensorOptions().dtype(dtype));
}

// Register weight [N, K] (and bias [N]) in the kernel's layout; the handle graphs and callers name it by.
int64_t register_matrix(const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.size(1) % 2 == 0,
              "bf16_gemv: the weight must be bfloat16 [N, K] with K even");
  const int64_t n = weight.size(0), k = weight.size(1), blocks = (n + kRows - 1) / kRows;
  const at::Tensor w = weight.contiguous();
  Matrix matrix{huge_page_tensor({blocks, k / 2, kRows, 2}, at::kBFloat16), at::Tensor(), n};
  const uint32_t* source = reinterpret_cast<const uint32_t*>(w.data_ptr<at::BFloat16>());  // pairs of inputs
  uint32_t* packed = reinterpret_cast<uint32_t*>(matrix.blocks.data_ptr<at::BFloat16>());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t r = 0; r < kRows; ++r) {  // a row read in order, written down its lane of the block
        const int64_t row = b * kRows + r;
        for (int64_t p = 0; p < k / 2; ++p) packed[(b * (k / 2) + p) * kRows + r] = row < n ? source[row * (k / 2) + p] : 0;
      }
  });
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "bf16_gemv: the bias must have one value per row");
    matrix.bias = at::zeros({blocks * kRows}, at::kFloat);
    matrix.bias.narrow(0, 0, n).copy_(bias->reshape({n}));
  }
  std::lock_guard<std::mutex> guard(registry_lock);
  registry.push_back(std::move(matrix));
  return static_cast<int64_t>(registry.size()) - 1;
}

void release_matrix(int64_t handle) {
  std::lock_guard<std::mutex> guard(registry_lock);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()), "bf16_gemv: no matrix ", handle);
  registry[handle] = Matrix{};
}

Matrix registered(int64_t handle) {
  std::lock_guard<std::mutex> guard(registry_lock);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(registry.size()) && registry[handle].blocks.defined(),
              "bf16_gemv: no matrix ", handle);
  return registry[handle];
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr const char* kIsa = "avx512_bf16";
// Input rows a pass over a block serves: two chains of sums a row in 32 registers leave room for the weights. A
// wider input runs in passes of 8 over the block while it is still in cache, so at batch 1 the weights stream once
// whatever the width, and each row's sums run in the same order whatever the width (row-invariant).
constexpr int64_t kMaxInputs = 8;
using Input = uint16_t;            // the input rows as they come, bfloat16

// One block's 16 outputs for `count` input rows (x: [count, K]), into out [count, 16] (float32).
template <int kCount>
void block_product(const uint16_t* w, const Input* x, int64_t k, float* out) {
  __m512 even[kCount], odd[kCount];  // two chains of sums, so no dot product waits on the one before
  for (int j = 0; j < kCount; ++j) even[j] = odd[j] = _mm512_setzero_ps();
  const int32_t* pairs = reinterpret_cast<const int32_t*>(x);
  const int64_t half = k / 2;
  int64_t p = 0;
  for (; p + 1 < half; p += 2) {
    const char* next = reinterpret_cast<const char*>(w + p * 2 * kRows) + kPrefetchBytes;
    _mm_prefetch(next, _MM_HINT_T0);
    _mm_prefetch(next + 64, _MM_HINT_T0);
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w + p * 2 * kRows);
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(w + (p + 1) * 2 * kRows);
    for (int j = 0; j < kCount; ++j) {
      even[j] = _mm512_dpbf16_ps(even[j], v0, (__m512bh)_mm512_set1_epi32(pairs[j * half + p]));
      odd[j] = _mm512_dpbf16_ps(odd[j], v1, (__m512bh)_mm512_set1_epi32(pairs[j * half + p + 1]));
    }
  }
  if (p < half) {  // K / 2 odd
    const __m512bh v = (__m512bh)_mm512_loadu_si512(w + p * 2 * kRows);
    for (int j = 0; j < kCount; ++j)
      even[j] = _mm512_dpbf16_ps(even[j], v, (__m512bh)_mm512_set1_epi32(pairs[j * half + p]));
  }
  for (int j = 0; j < kCount; ++j) _mm512_storeu_ps(out + j * kRows, _mm512_add_ps(even[j], odd[j]));
}

void rows_product(const uint16_t* w, const Input* x, int64_t count, int64_t k, float* out) {
  switch (count) {
    case 1: return block_product<1>(w, x, k, out);
    case 2: return block_product<2>(w, x, k, out);
    case 3: return block_product<3>(w, x, k, out);
    case 4: return block_product<4>(w, x, k, out);
    case 5: return block_product<5>(w, x, k, out);
    case 6: return block_product<6>(w, x, k, out);
    case 7: return block_product<7>(w, x, k, out);
    default: return block_product<8>(w, x, k, out);
  }
}

// The block's sums (plus bias) rounded to bfloat16 into rows [first, first + count) of out [M, N].
void store(const float* sums, const float* bias, int64_t count, int64_t first, int64_t n, int64_t b,
           at::BFloat16* out) {
  const int64_t valid = std::min(kRows, n - b * kRows);
  const __mmask16 mask = valid == kRows ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  for (int64_t j = 0; j < count; ++j) {
    __m512 v = _mm512_loadu_ps(sums + j * kRows);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + b * kRows));
    const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_mask_storeu_epi16(out + (first + j) * n + b * kRows, mask, rounded);
  }
}

#elif defined(__AVX2__) && defined(__FMA__)
// Without bf16 instructions: a bfloat16 is the top half of a float32, so a shift or a mask turns 16 weights into
// floats, and FMAs multiply them; still far quicker than memory delivers them on two cores.
constexpr const char* kIsa = "avx2";
constexpr int64_t kMaxInputs = 2;  // 16 ymm registers: the sums of two input rows and the weights in use
using Input = float;               // the input rows converted once per call

template <int kCount>
void block_product(const uint16_t* w, const Input* x, int64_t k, float* out) {
  __m256 sums[kCount][2][2];  // [input row][block rows 0-7 / 8-15][even / odd input]
  for (int j = 0; j < kCount; ++j)
    for (int h = 0; h < 2; ++h) sums[j][h][0] = sums[j][h][1] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t p = 0; p < k / 2; ++p) {
    const uint16_t* pair = w + p * 2 * kRows;  // 64 bytes: rows 0-7's two weights, then rows 8-15's
    _mm_prefetch(reinterpret_cast<const char*>(pair) + kPrefetchBytes, _MM_HINT_T0);
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair + 16 * h));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      for (int j = 0; j < kCount; ++j) {
        sums[j][h][0] = _mm256_fmadd_ps(even, _mm256_broadcast_ss(x + j * k + 2 * p), sums[j][h][0]);
        sums[j][h][1] = _mm256_fmadd_ps(odd, _mm256_broadcast_ss(x + j * k + 2 * p + 1), sums[j][h][1]);
      }
    }
  }
  for (int j = 0; j < kCount; ++j)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + j * kRows + 8 * h, _mm256_add_ps(sums[j][h][0], sums[j][h][1]));
}

void rows_product(const uint16_t* w, const Input* x, int64_t count, int64_t k, float* out) {
  if (count == 1) return block_product<1>(w, x, k, out);
  block_product<2>(w, x, k, out);
}

void store(const float* sums, const float* bias, int64_t count, int64_t first, int64_t n, int64_t b,
           at::BFloat16* out) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t r = 0; r < kRows && b * kRows + r < n; ++r)
      out[(first + j) * n + b * kRows + r] = at::BFloat16(sums[j * kRows + r] + (bias ? bias[b * kRows + r] : 0.f));
}
#else
constexpr const char* kIsa = "";
#endif

// Which of the kernel's branches this build runs: "avx512_bf16", "avx2", or "" (none: `gemv` refuses).
std::string isa() { return kIsa; }

// x [..., K] bfloat16 -> [..., N] bfloat16 through the registered matrix `handle`.
at::Tensor gemv(const at::Tensor& x, int64_t handle, int64_t out_features) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__) || defined(__AVX2__) && defined(__FMA__)
  const Matrix matrix = registered(handle);
  const int64_t k = matrix.blocks.size(1) * 2, n = matrix.rows, blocks = matrix.blocks.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.size(-1) == k, "bf16_gemv: x must be bfloat16 [..., ", k, "]");
  TORCH_CHECK(out_features == n, "bf16_gemv: matrix ", handle, " has ", n, " rows, not ", out_features);
  const at::Tensor input = std::is_same_v<Input, float> ? x.to(at::kFloat).contiguous() : x.contiguous();
  const int64_t m = input.numel() / k;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(matrix.blocks.data_ptr<at::BFloat16>());
  const Input* xs = static_cast<const Input*>(input.data_ptr());
  const float* bias = matrix.bias.defined() ? matrix.bias.data_ptr<float>() : nullptr;
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    float sums[kMaxInputs * kRows];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < m; i += kMaxInputs) {  // the block stays in cache for the next input rows
        const int64_t count = std::min(kMaxInputs, m - i);
        rows_product(w + b * k * kRows, xs + i * k, count, k, sums);
        store(sums, bias, count, i, n, b, o);
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "bf16_gemv: built for a CPU without AVX-512 bf16 or AVX2 instructions");
#endif
}

}  // namespace

TORCH_LIBRARY(selfspec_bf16, m) {
  m.def("register_matrix(Tensor weight, Tensor? bias) -> int", &register_matrix);
  m.def("release_matrix(int handle) -> ()", &release_matrix);
  m.def("gemv(Tensor x, int handle, int out_features) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(selfspec_bf16, CPU, m) { m.impl("gemv", &gemv); }
