// x W^T with W kept in GGUF's own Q4_0 / Q4_1 / Q8_0 blocks, computed in float32 (lmstack/kernels/__init__.py
// says why).
//
// x [M, K] float32, blocks [N, K / 32 * bytes] uint8 (each row its GGUF blocks, as the file stores them) ->
// [M, N] float32. A block is 32 consecutive values of a row:
//   Q4_0, 18 bytes: d (fp16), qs[16]          w = (q - 8) d
//   Q4_1, 20 bytes: d (fp16), m (fp16), qs[16] w = q d + m
//   Q8_0, 34 bytes: d (fp16), qs[32] int8      w = q d
// In Q4 blocks byte j holds value j in its low nibble and value j + 16 in its high one.
// The dot product of a block is d * sum(q x) + m * sum(x), with sum(x) computed once per block of x: the same
// float32 numbers as the dequantized weight up to the order of the float32 sums. A few rows of x (decode) read
// each block once for all rows, parallel over output rows; more rows (prefill) dequantize tiles of W to float32
// and multiply them with at::mm.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 8;    // rows of x computed by the block kernel; more go through dequantize + mm
constexpr int64_t kTileRows = 256;  // rows of W dequantized at a time for the mm path

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // GGML type ids

int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    default: TORCH_CHECK(false, "gguf_matmul: block type ", qtype, " is not Q4_0 (2), Q4_1 (3) or Q8_0 (8)");
  }
}

inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// The block's scale d, its offset m (w = q d + m with q the code as stored: Q4_0 codes are 0..15, offset -8d),
// and its 32 codes as float32.
template <int64_t QT>
inline void block_codes(const uint8_t* blk, float& d, float& m, float* q) {
  d = half(blk);
  if constexpr (QT == Q8_0) {
    m = 0.f;
    const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
    for (int64_t j = 0; j < kBlock; ++j) q[j] = static_cast<float>(qs[j]);
  } else {
    m = QT == Q4_1 ? half(blk + 2) : -8.f * d;
    const uint8_t* qs = blk + (QT == Q4_1 ? 4 : 2);
    for (int64_t j = 0; j < 16; ++j) {
      q[j] = static_cast<float>(qs[j] & 0xF);
      q[j + 16] = static_cast<float>(qs[j] >> 4);
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// 8 bytes -> 8 floats
inline __m256 bytes_to_float(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 sbytes_to_float(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// out[r, n] for rows r < R of x and output rows n in [n0, n1). xsum [R, NB]: each block's sum of x.
template <int64_t QT, int64_t R>
void block_rows(const float* x, const float* xsum, const uint8_t* w, float* out, int64_t K, int64_t N,
                int64_t n0, int64_t n1) {
  constexpr int64_t bytes = QT == Q4_0 ? 18 : QT == Q4_1 ? 20 : 34;
  const int64_t NB = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * NB * bytes;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    // Two accumulators a row where registers allow, even and odd blocks: one chain of dependent FMAs a row
    // would wait on the FMA latency every block.
    constexpr int64_t A = R <= 4 ? 2 : 1;
    __m256 acc[R][A];
    float macc[R];
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
      macc[r] = 0.f;
    }
    for (int64_t b = 0; b < NB; ++b) {
      const uint8_t* blk = row + b * bytes;
      __m256 f[4];  // the block's 32 codes as floats, values 0..7, 8..15, 16..23, 24..31
      if constexpr (QT == Q8_0) {
        const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
        const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
        f[0] = sbytes_to_float(q0), f[1] = sbytes_to_float(_mm_srli_si128(q0, 8));
        f[2] = sbytes_to_float(q1), f[3] = sbytes_to_float(_mm_srli_si128(q1, 8));
      } else {
        const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (QT == Q4_1 ? 4 : 2)));
        const __m128i low = _mm_set1_epi8(0xF);
        const __m128i lo = _mm_and_si128(qs, low), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low);
        f[0] = bytes_to_float(lo), f[1] = bytes_to_float(_mm_srli_si128(lo, 8));
        f[2] = bytes_to_float(hi), f[3] = bytes_to_float(_mm_srli_si128(hi, 8));
      }
      const float d = half(blk);
      const __m256 dv = _mm256_set1_ps(d);
      const float m = QT == Q4_1 ? half(blk + 2) : QT == Q4_0 ? -8.f * d : 0.f;
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * K + b * kBlock;
        __m256 t = _mm256_mul_ps(f[0], _mm256_loadu_ps(xr));
        t = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xr + 8), t);
        t = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xr + 16), t);
        t = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xr + 24), t);
        acc[r][b % A] = _mm256_fmadd_ps(t, dv, acc[r][b % A]);
        if constexpr (QT != Q8_0) macc[r] += m * xsum[r * NB + b];
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      __m256 sum = acc[r][0];
      for (int64_t a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[r][a]);
      out[r * N + n] = hsum(sum) + macc[r];
    }
#else
    float acc[R] = {};
    float q[kBlock];
    for (int64_t b = 0; b < NB; ++b) {
      float d, m;
      block_codes<QT>(row + b * bytes, d, m, q);
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * K + b * kBlock;
        float t = 0.f;
        for (int64_t j = 0; j < kBlock; ++j) t += q[j] * xr[j];
        acc[r] += d * t + m * xsum[r * NB + b];
      }
    }
    for (int64_t r = 0; r < R; ++r) out[r * N + n] = acc[r];
#endif
  }
}

template <int64_t QT>
void few_rows(const at::Tensor& x, const uint8_t* w, at::Tensor& out, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), NB = K / kBlock;
  const float* xp = x.data_ptr<float>();
  std::vector<float> xsum(M * NB);  // [M, NB]: each block's sum of x, for the offsets m
  for (int64_t i = 0; i < M * NB; ++i) {
    float t = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) t += xp[i * kBlock + j];
    xsum[i] = t;
  }
  const float* sp = xsum.data();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, N / (4 * at::get_num_threads()));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: block_rows<QT, 1>(xp, sp, w, op, K, N, n0, n1); break;
      case 2: block_rows<QT, 2>(xp, sp, w, op, K, N, n0, n1); break;
      case 3: block_rows<QT, 3>(xp, sp, w, op, K, N, n0, n1); break;
      case 4: block_rows<QT, 4>(xp, sp, w, op, K, N, n0, n1); break;
      case 5: block_rows<QT, 5>(xp, sp, w, op, K, N, n0, n1); break;
      case 6: block_rows<QT, 6>(xp, sp, w, op, K, N, n0, n1); break;
      case 7: block_rows<QT, 7>(xp, sp, w, op, K, N, n0, n1); break;
      default: block_rows<QT, 8>(xp, sp, w, op, K, N, n0, n1);
    }
  });
}

// Rows [n0, n1) of W as float32, w = q d + m computed in float32 (as gguf.quants.dequantize does).
template <int64_t QT>
void dequantize_rows(const uint8_t* w, float* dst, int64_t K, int64_t n0, int64_t n1) {
  const int64_t NB = K / kBlock, bytes = block_bytes(QT);
  float q[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < NB; ++b) {
      float d, m;
      block_codes<QT>(w + (n * NB + b) * bytes, d, m, q);
      float* o = dst + (n - n0) * K + b * kBlock;
      if constexpr (QT == Q4_0) {
        for (int64_t j = 0; j < kBlock; ++j) o[j] = (q[j] - 8.f) * d;
      } else {
        for (int64_t j = 0; j < kBlock; ++j) o[j] = q[j] * d + m;
      }
    }
  }
}

template <int64_t QT>
void many_rows(const at::Tensor& x, const uint8_t* w, at::Tensor& out, int64_t N) {
  const int64_t K = x.size(1);
  at::Tensor tile = at::empty({std::min(kTileRows, N), K}, x.options());
  for (int64_t t0 = 0; t0 < N; t0 += kTileRows) {
    const int64_t t1 = std::min(N, t0 + kTileRows);
    float* tp = tile.data_ptr<float>() - t0 * K;  // row n of the tile at tp + n * K
    at::parallel_for(t0, t1, 16, [&](int64_t n0, int64_t n1) {
      dequantize_rows<QT>(w, tp + n0 * K, K, n0, n1);
    });
    out.narrow(1, t0, t1 - t0).copy_(at::mm(x, tile.narrow(0, 0, t1 - t0).t()));
  }
}

at::Tensor gguf_matmul(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype) {
  const int64_t bytes = block_bytes(qtype);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "gguf_matmul: x must be contiguous float32 [M, K]");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous(),
              "gguf_matmul: blocks must be contiguous uint8 [N, K / 32 * bytes]");
  const int64_t M = x.size(0), K = x.size(1), N = blocks.size(0);
  TORCH_CHECK(K % kBlock == 0 && blocks.size(1) == K / kBlock * bytes, "gguf_matmul: x has K = ", K,
              " but the blocks are [", N, ", ", blocks.size(1), "] (", bytes, " bytes a block of 32)");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  auto go = [&](auto qt) {
    constexpr int64_t QT = decltype(qt)::value;
    if (M <= kMaxRows) {
      few_rows<QT>(x, w, out, N);
    } else {
      many_rows<QT>(x, w, out, N);
    }
  };
  switch (qtype) {
    case Q4_0: go(std::integral_constant<int64_t, Q4_0>{}); break;
    case Q4_1: go(std::integral_constant<int64_t, Q4_1>{}); break;
    default: go(std::integral_constant<int64_t, Q8_0>{});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmstack, m) { m.def("gguf_matmul(Tensor x, Tensor blocks, int qtype) -> Tensor"); }

TORCH_LIBRARY_IMPL(lmstack, CPU, m) { m.impl("gguf_matmul", &gguf_matmul); }
