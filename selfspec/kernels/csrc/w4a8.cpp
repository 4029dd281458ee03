// A low-bit draft's matrix product for one to a few input rows: int4 weight codes (0..15, a scale and a min per
// group of 32 inputs) against activations rounded to int8 per group of 32, summed in integer dot products.
//
// Why: torch's int4 weight-only kernel turns every code into a float before multiplying, which on a small CPU
// costs more than streaming the bytes; integer dot products (VNNI's vpdpbusd, or AVX2's vpmaddubsw) multiply 64
// codes an instruction, so the product runs at the speed the weights stream. Rounding the activations only
// changes how often the draft agrees; the verify pass never runs a low-bit weight.
//
// Weight layout (made by selfspec/w4a8.py): rows in blocks of 16, one row per 32-bit lane. For a block and
// inputs k..k+7, 64 bytes: lane r holds row r's codes for k..k+3 in its low nibbles and k+4..k+7 in its high
// ones. Scales: float16 [blocks, K / 32, 2, 16], the group's scale then its min, one per row of the block.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kRows = 16;   // output rows per block
constexpr int64_t kGroup = 32;  // inputs per scale
constexpr int64_t kChunk = 64;  // bytes per block and 8 inputs
// How far ahead of the codes in use to ask for the next ones. A thread streams its blocks in order, so this runs
// on into the next block; the hardware prefetcher alone left the product at ~20 GB/s where a plain read of
// memory ran 30 (qwen2.5-coder-0.5b's layers, 2 threads: 11.2 ms without, 9.1 with, a Xeon with AVX-512).
constexpr int64_t kPrefetchBytes = 2048;

struct RoundedRow {
  std::vector<int8_t> codes;  // [K]
  std::vector<float> scales;  // [K / 32]
  std::vector<float> sums;    // [K / 32]: the group's exact sum, which each row's min multiplies
};

template <typename T>
RoundedRow round_row(const T* x, int64_t k) {
  RoundedRow row{std::vector<int8_t>(k), std::vector<float>(k / kGroup), std::vector<float>(k / kGroup)};
  for (int64_t g = 0; g < k / kGroup; ++g) {
    float xs[kGroup];
    float peak = 0.f, sum = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      xs[i] = static_cast<float>(x[g * kGroup + i]);
      peak = std::max(peak, std::fabs(xs[i]));
      sum += xs[i];
    }
    const float scale = peak / 127.f;
    const float inverse = peak > 0.f ? 127.f / peak : 0.f;
    for (int64_t i = 0; i < kGroup; ++i) row.codes[g * kGroup + i] = static_cast<int8_t>(std::nearbyint(xs[i] * inverse));
    row.scales[g] = scale;
    row.sums[g] = sum;
  }
  return row;
}

// A group's codes are 4 cache lines; ask for those kPrefetchBytes on (a prefetch past the end never faults).
inline void prefetch_group(const uint8_t* codes) {
  for (int64_t line = 0; line < 4; ++line)
    _mm_prefetch(reinterpret_cast<const char*>(codes + line * kChunk + kPrefetchBytes), _MM_HINT_T0);
}

// One block's 16 outputs for one rounded input row. w: the block's [K / 8, 64] bytes; sm: its [K / 32, 2, 16] scales.
void block_product(const uint8_t* w, const uint16_t* sm, const RoundedRow& x, int64_t groups, float* out) {
  const int32_t* words = reinterpret_cast<const int32_t*>(x.codes.data());  // 4 activation codes a word
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 total = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_group(w + g * 4 * kChunk);
    __m512i dot = _mm512_setzero_si512();
    for (int64_t c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(w + (g * 4 + c) * kChunk);
      dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(v, nibble), _mm512_set1_epi32(words[g * 8 + 2 * c]));
      dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble),
                                _mm512_set1_epi32(words[g * 8 + 2 * c + 1]));
    }
    const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm + g * 32)));
    const __m512 min = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm + g * 32 + 16)));
    const __m512 products = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(x.scales[g]));
    total = _mm512_fmadd_ps(products, scale, total);
    total = _mm512_fmadd_ps(_mm512_set1_ps(x.sums[g]), min, total);
  }
  _mm512_storeu_ps(out, total);
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t half = 0; half < 2; ++half) {  // rows 0-7 are a chunk's first 32 bytes, rows 8-15 its last 32
    __m256 total = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      if (half == 0) prefetch_group(w + g * 4 * kChunk);
      __m256i dot = _mm256_setzero_si256();
      for (int64_t c = 0; c < 4; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (g * 4 + c) * kChunk + 32 * half));
        // codes <= 15 and |activations| <= 127: the 16-bit pair sums cannot saturate (4 products <= 7620)
        const __m256i pairs = _mm256_add_epi16(
            _mm256_maddubs_epi16(_mm256_and_si256(v, nibble), _mm256_set1_epi32(words[g * 8 + 2 * c])),
            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
                                 _mm256_set1_epi32(words[g * 8 + 2 * c + 1])));
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(pairs, ones));
      }
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sm + g * 32 + 8 * half)));
      const __m256 min = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sm + g * 32 + 16 + 8 * half)));
      const __m256 products = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(x.scales[g]));
      total = _mm256_fmadd_ps(products, scale, total);
      total = _mm256_fmadd_ps(_mm256_set1_ps(x.sums[g]), min, total);
    }
    _mm256_storeu_ps(out + 8 * half, total);
  }
#else
  for (int64_t r = 0; r < kRows; ++r) {
    float total = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t dot = 0;
      for (int64_t c = 0; c < 4; ++c) {
        for (int64_t j = 0; j < 4; ++j) {
          const uint8_t byte = w[(g * 4 + c) * kChunk + 4 * r + j];
          dot += (byte & 15) * x.codes[g * kGroup + 8 * c + j] + (byte >> 4) * x.codes[g * kGroup + 8 * c + 4 + j];
        }
      }
      const float scale = _cvtsh_ss(sm[g * 32 + r]), min = _cvtsh_ss(sm[g * 32 + 16 + r]);
      total += dot * x.scales[g] * scale + x.sums[g] * min;
    }
    out[r] = total;
  }
#endif
}

template <typename T>
void product(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, at::Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), blocks = packed.size(0), groups = k / kGroup, n = out.size(1);
  std::vector<RoundedRow> rows;
  for (int64_t i = 0; i < m; ++i) rows.push_back(round_row(x.data_ptr<T>() + i * k, k));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* sm = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  T* o = out.data_ptr<T>();
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    float block[kRows];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < m; ++i) {  // the block's bytes stay in cache for the next input row
        block_product(w + b * (k / 8) * kChunk, sm + b * groups * 2 * kRows, rows[i], groups, block);
        for (int64_t r = 0; r < kRows && b * kRows + r < n; ++r) o[i * n + b * kRows + r] = static_cast<T>(block[r]);
      }
    }
  });
}

// x [M, K] -> [M, out_features] in x's dtype: packed uint8 [N / 16, K / 8, 64], scales float16 [N / 16, K / 32, 2, 16]
at::Tensor w4a8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % kGroup == 0, "w4a8_linear: x must be [M, K] with K a multiple of 32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 8 == x.size(1),
              "w4a8_linear: packed weights must be contiguous uint8 [N / 16, K / 8, 64]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "w4a8_linear: scales must be float16");
  TORCH_CHECK(out_features <= packed.size(0) * kRows, "w4a8_linear: more outputs than packed rows");
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "w4a8_linear",
                                  [&] { product<scalar_t>(input, packed, scales, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY(selfspec_w4a8, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(selfspec_w4a8, CPU, m) { m.impl("linear", &w4a8_linear); }
