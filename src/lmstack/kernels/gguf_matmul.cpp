// x W^T with W kept in GGUF's own Q4_0 / Q4_1 / Q8_0 blocks, computed in float32 (lmstack/kernels/__init__.py
// says why).
//
// x [M, K] float32, blocks [N, K / 32 * bytes] uint8 (each row its GGUF blocks, as the file stores them) ->
// [M, N] float32. A block is 32 consecutive values of a row:
//   Q4_0, 18 bytes: d (fp16), qs[16]          w = (q - 8) d
//   Q4_1, 20 bytes: d (fp16), m (fp16), qs[16] w = q d + m
//   Q8_0, 34 bytes: d (fp16), qs[32] int8      w = q d
// In Q4 blocks byte j holds value j in its low nibble and value j + 16 in its high one.
// The dot product of a block is d * sum(q x) + m * sum(x), with sum(x) computed once per block of x in float32.
// A few rows of x (decode) read each block once for all rows, parallel over output rows. With AVX2 they round x
// to int16 per block of 32 (x = xq * sx, |error| <= 1.5e-5 of the block's largest |x|: 256 times finer than
// llama.cpp's int8 activations) so that sum(q xq) is exact integer arithmetic (madd): half the instructions of
// converting every code to float. One row of x (the decode step) takes output rows eight at a time, so the float
// work of a block (scales, conversions) is shared by eight.
// Up to 32 rows (batched decode) go through in passes of 8 rows. More rows (prefill) dequantize tiles of W to
// float32 and multiply them with at::mm: the float32 model's numbers up to the order of the sums.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 8;    // rows of x the block kernel computes in one pass over W
constexpr int64_t kFewRows = 32;   // up to this many rows, passes of 8; more go through dequantize + mm
constexpr int64_t kTileRows = 256;  // rows of W dequantized at a time for the mm path

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // GGML type ids
template <int64_t QT>
constexpr int64_t kBytes = QT == Q4_0 ? 18 : QT == Q4_1 ? 20 : 34;  // bytes a block

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

// f(std::integral_constant<int64_t, R>{}) for R = M (1..8): the row count as a template argument, so the
// per-row accumulators are registers.
template <class F>
void with_rows(int64_t M, F&& f) {
  switch (M) {
    case 1: f(std::integral_constant<int64_t, 1>{}); break;
    case 2: f(std::integral_constant<int64_t, 2>{}); break;
    case 3: f(std::integral_constant<int64_t, 3>{}); break;
    case 4: f(std::integral_constant<int64_t, 4>{}); break;
    case 5: f(std::integral_constant<int64_t, 5>{}); break;
    case 6: f(std::integral_constant<int64_t, 6>{}); break;
    case 7: f(std::integral_constant<int64_t, 7>{}); break;
    default: f(std::integral_constant<int64_t, 8>{});
  }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The block's 32 codes as int16: w0 values 0..15, w1 values 16..31 (Q4: 0..15 as stored; Q8_0: -128..127).
template <int64_t QT>
inline void codes16(const uint8_t* blk, __m256i& w0, __m256i& w1) {
  if constexpr (QT == Q8_0) {
    w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
  } else {
    const __m128i low = _mm_set1_epi8(0xF);
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (QT == Q4_1 ? 4 : 2)));
    w0 = _mm256_cvtepu8_epi16(_mm_and_si128(qs, low));
    w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(qs, 4), low));
  }
}

// Ask for the cache lines of [p, p + bytes) ahead of use. Decode streams each weight once from memory, and the
// hardware prefetcher alone left the loops waiting on it: with these, SmolLM2's compiled decode ran 1.39x faster
// (docs/benchmarks.md, "Block kernels: prefetching").
inline void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}
constexpr int64_t kAhead = 4;  // block_rows prefetches the row this many on

// [a0 b0 a1 b1 ...] as f0 = pairs 0..3, f1 = pairs 4..7 -> the 8 a's (Odd = false) or the 8 b's (true), in order:
// shuffle_ps gives [0 1 4 5 | 2 3 6 7]; the 64-bit permute puts them in order.
template <bool Odd>
inline __m256 deinterleave(__m256 f0, __m256 f1) {
  const __m256 picked = _mm256_shuffle_ps(f0, f1, Odd ? 0xDD : 0x88);
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(picked), 0xD8));
}

// x [M, K] -> xq [M, K] int16 and sx [M, NB] with x ~ xq * sx per block of 32 (|error| <= sx / 2 = amax / 65534,
// about 1.5e-5 of the block's largest value), and xsum [M, NB], each block's float32 sum of x.
void quantize_x(const float* x, int64_t blocks, int16_t* xq, float* sx, float* xsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < blocks; ++i) {
    const float* xb = x + i * kBlock;
    __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
      sum = _mm256_add_ps(sum, v[j]);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float a = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    sx[i] = a / 32767.f;
    xsum[i] = hsum(sum);
    const __m256 inv = _mm256_set1_ps(a > 0.f ? 32767.f / a : 0.f);
    for (int j = 0; j < 4; j += 2) {  // round to nearest; packs interleaves 128-bit lanes, the permute undoes it
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[j + 1], inv));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i * kBlock + 8 * j), packed);
    }
  }
}

// out[r, n] for rows r < R of x and output rows n in [n0, n1): per block, the codes as int16 times xq summed
// exactly in int32 (madd), scaled by d * sx in float32, plus m * sum(x) for the Q4 offsets.
template <int64_t QT, int64_t R>
void block_rows(const int16_t* xq, const float* sx, const float* xsum, const uint8_t* w, float* out, int64_t K,
                int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t bytes = kBytes<QT>;
  // Two accumulators a row where registers allow, even and odd blocks: one chain of dependent FMAs a row
  // would wait on the FMA latency every block.
  constexpr int64_t A = R <= 4 ? 2 : 1;
  const int64_t NB = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * NB * bytes;
    if (n + kAhead < n1) prefetch(row + kAhead * NB * bytes, NB * bytes);
    __m256 acc[R][A];
    float macc[R][A];
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps(), macc[r][a] = 0.f;
    }
    // b steps A blocks at a time, so that acc[r][a] has a constant index and stays in a register (b % A kept
    // the accumulators on the stack: a store and a reload a block).
    auto block = [&](int64_t b, auto a) {
      const uint8_t* blk = row + b * bytes;
      __m256i w0, w1;
      codes16<QT>(blk, w0, w1);
      float d, m;
      if constexpr (QT == Q4_1) {  // d and m side by side: one conversion
        int32_t dm;
        std::memcpy(&dm, blk, 4);
        const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
        d = _mm_cvtss_f32(f), m = _mm_cvtss_f32(_mm_movehdup_ps(f));
      } else {
        d = half(blk), m = QT == Q4_0 ? -8.f * d : 0.f;
      }
      for (int64_t r = 0; r < R; ++r) {
        const int16_t* xr = xq + r * K + b * kBlock;
        const __m256i p = _mm256_add_epi32(
            _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
            _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16))));
        acc[r][a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * sx[r * NB + b]), acc[r][a]);
        if constexpr (QT != Q8_0) macc[r][a] += m * xsum[r * NB + b];
      }
    };
    int64_t b = 0;
    for (; b + A <= NB; b += A) {
      block(b, std::integral_constant<int64_t, 0>{});
      if constexpr (A == 2) block(b + 1, std::integral_constant<int64_t, 1>{});
    }
    if (b < NB) block(b, std::integral_constant<int64_t, 0>{});
    for (int64_t r = 0; r < R; ++r) {
      __m256 sum = acc[r][0];
      float msum = macc[r][0];
      for (int64_t a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[r][a]), msum += macc[r][a];
      out[r * N + n] = hsum(sum) + msum;
    }
  }
}

// One row of x (decode), output rows [8 g0, 8 g1) eight at a time: the eight int32 block products are summed
// across lanes together (a tree of hadds), and the eight rows' d and m are read with one gather and converted
// together, so the per-block float work is shared by eight rows instead of repeated for each.
template <int64_t QT>
void eight_rows(const int16_t* xq, const float* sx, const float* xsum, const uint8_t* w, float* out, int64_t K,
                int64_t g0, int64_t g1) {
  constexpr int64_t bytes = kBytes<QT>;
  const int64_t NB = K / kBlock, stride = NB * bytes;
  const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(static_cast<int32_t>(stride)));
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* base = w + g * 8 * stride;
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    for (int64_t b = 0; b < NB; ++b) {
      const uint8_t* blk = base + b * bytes;
      if (g + 1 < g1) prefetch(base + 8 * stride + b * 8 * bytes, 8 * bytes);  // the next group, 1/NB of it a block
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock + 16));
      __m256i p[8];
      for (int i = 0; i < 8; ++i) {
        __m256i w0, w1;
        codes16<QT>(blk + i * stride, w0, w1);
        p[i] = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
      }
      // lane sums: h0123 = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low and high 128-bit halves), likewise h4567
      const __m256i h0123 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
      const __m256i h4567 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
      const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                                            _mm256_permute2x128_si256(h0123, h4567, 0x31));  // [s0 .. s7]
      // the 8 rows' first 4 bytes: d (fp16) and, in Q4_1, m (fp16) -> [d0 m0 d1 m1 ...] as float
      const __m256i dm = _mm256_i32gather_epi32(reinterpret_cast<const int*>(blk), idx, 1);
      const __m256 f0 = _mm256_cvtph_ps(_mm256_castsi256_si128(dm));       // d0 m0 d1 m1 d2 m2 d3 m3
      const __m256 f1 = _mm256_cvtph_ps(_mm256_extracti128_si256(dm, 1));  // d4 m4 ... d7 m7
      const __m256 d = deinterleave<false>(f0, f1);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(d, _mm256_set1_ps(sx[b])), acc);
      if constexpr (QT != Q8_0) {
        const __m256 m = QT == Q4_1 ? deinterleave<true>(f0, f1) : _mm256_mul_ps(d, _mm256_set1_ps(-8.f));
        macc = _mm256_fmadd_ps(m, _mm256_set1_ps(xsum[b]), macc);
      }
    }
    _mm256_storeu_ps(out + g * 8, _mm256_add_ps(acc, macc));
  }
}

template <int64_t QT>
void few_rows(const at::Tensor& x, const uint8_t* w, at::Tensor& out, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), NB = K / kBlock;
  std::vector<int16_t> xq(M * K);
  std::vector<float> sx(M * NB), xsum(M * NB);
  quantize_x(x.data_ptr<float>(), M * NB, xq.data(), sx.data(), xsum.data());
  const int16_t* qp = xq.data();
  const float *sp = sx.data(), *up = xsum.data();
  float* op = out.data_ptr<float>();
  if (M == 1 && QT != Q8_0) {  // (Q8_0's bytes a block make the per-row loop bandwidth-bound already)
    const int64_t groups = N / 8, grain = std::max<int64_t>(2, groups / (4 * at::get_num_threads()));
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      eight_rows<QT>(qp, sp, up, w, op, K, g0, g1);
    });
    if (N > groups * 8) block_rows<QT, 1>(qp, sp, up, w, op, K, N, groups * 8, N);
    return;
  }
  const int64_t grain = std::max<int64_t>(16, N / (4 * at::get_num_threads()));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    with_rows(M, [&](auto r) { block_rows<QT, decltype(r)::value>(qp, sp, up, w, op, K, N, n0, n1); });
  });
}
#else
// Without AVX2: float32 throughout. xsum [R, NB]: each block's sum of x.
template <int64_t QT, int64_t R>
void block_rows(const float* x, const float* xsum, const uint8_t* w, float* out, int64_t K, int64_t N,
                int64_t n0, int64_t n1) {
  constexpr int64_t bytes = kBytes<QT>;
  const int64_t NB = K / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * NB * bytes;
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
  }
}

template <int64_t QT>
void few_rows(const at::Tensor& x, const uint8_t* w, at::Tensor& out, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1), NB = K / kBlock;
  const float* xp = x.data_ptr<float>();
  std::vector<float> xsum(M * NB);
  for (int64_t i = 0; i < M * NB; ++i) {
    float t = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) t += xp[i * kBlock + j];
    xsum[i] = t;
  }
  const float* sp = xsum.data();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, N / (4 * at::get_num_threads()));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    with_rows(M, [&](auto r) { block_rows<QT, decltype(r)::value>(xp, sp, w, op, K, N, n0, n1); });
  });
}
#endif

// Rows [n0, n1) of W as float32, w = q d + m computed in float32 (as gguf.quants.dequantize does).
template <int64_t QT>
void dequantize_rows(const uint8_t* w, float* dst, int64_t K, int64_t n0, int64_t n1) {
  const int64_t NB = K / kBlock, bytes = kBytes<QT>;
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
    if (M <= kFewRows) {  // a batch of decode rows: re-reading W per 8 rows beats writing it out as float32
      for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {  // (16 rows: 2.5-5x faster; 64 rows: even for Q4)
        at::Tensor part = out.narrow(0, r0, std::min(kMaxRows, M - r0));
        few_rows<QT>(x.narrow(0, r0, part.size(0)), w, part, N);
      }
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
