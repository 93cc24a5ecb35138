// One-query attention over a KV cache, for the compiled CPU decode step (lmstack/kernels/__init__.py says why).
//
// q [B, H, 1, D] (bfloat16 or float32), k, v [B, Hkv, S, D] (bfloat16, float16 or float32, the last dim
// contiguous), D in 16, 32, 64, 128, mask bool [B|1, 1, 1, S] (true = attend) or none -> [B, H, 1, D] in q's
// dtype, computed in float32. Query head h reads kv head h / (H / Hkv), as SDPA with enable_gqa. Masked slots
// are skipped, not computed: a decode step over a cache pool pays for the slots each row has written. The slots
// are cut into chunks, each (row, kv head, chunk) is one task with its own running max and sum (flash-decoding),
// so a batch of one still spreads over the threads; the chunks are merged at the end. A row with no visible slot
// gives zeros.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 128;  // slots per task
constexpr int64_t kMaxG = 16;    // query heads per kv head

// Row [D] of the cache as float32 vectors.
template <int64_t D>
inline void load_row(const float* src, Vec* dst) {
  for (int64_t j = 0; j < D / Vec::size(); ++j) dst[j] = Vec::loadu(src + j * Vec::size());
}
template <int64_t D, typename T>  // T: c10::BFloat16 or c10::Half
inline void load_row(const T* src, Vec* dst) {
  using VecH = at::vec::Vectorized<T>;  // holds 2 * Vec::size() values
  if constexpr (D % VecH::size() == 0) {
    for (int64_t j = 0; j < D / VecH::size(); ++j) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VecH::loadu(src + j * VecH::size()));
      dst[2 * j] = lo;
      dst[2 * j + 1] = hi;
    }
  } else {  // a head dim shorter than one half-precision vector
    alignas(64) float row[D];
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(src[d]);
    load_row<D>(static_cast<const float*>(row), dst);
  }
}

// One task: slots [s0, s1) of one (row, kv head) for its G query heads. q [G, D] (scaled, float32). Leaves the
// max score m [G], the sum of exp(score - m) l [G] and the unnormalized output acc [G, D]. Three passes over the
// chunk's visible slots (scores, exponentials, weighted values), each in ATen's vector types (as inductor's
// kernels), with D a template argument so the per-slot loops unroll.
template <typename KV, int64_t D>
void attend_chunk(const float* q, const KV* k, const KV* v, int64_t slot_stride, const bool* mask,
                  int64_t mask_stride, int64_t s0, int64_t s1, int64_t G, float* m, float* l, float* acc) {
  constexpr int64_t W = D / Vec::size();  // vectors per row
  int64_t slots[kChunk];
  int64_t n = 0;
  for (int64_t s = s0; s < s1; ++s) {
    if (mask == nullptr || mask[s * mask_stride]) slots[n++] = s;
  }
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  if (n == 0) return;
  Vec qv[kMaxG][W], row[W];
  for (int64_t g = 0; g < G; ++g) load_row<D>(q + g * D, qv[g]);
  alignas(64) float p[kMaxG][kChunk];  // scores, then exp(score - max)
  for (int64_t i = 0; i < n; ++i) {
    load_row<D>(k + slots[i] * slot_stride, row);
    for (int64_t g = 0; g < G; ++g) {
      Vec dot = qv[g][0] * row[0];
      for (int64_t j = 1; j < W; ++j) dot = at::vec::fmadd(qv[g][j], row[j], dot);
      p[g][i] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, dot);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float mx = *std::max_element(p[g], p[g] + n);
    const Vec vmx(mx);
    Vec sum(0.f);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec e = (Vec::loadu(p[g] + i) - vmx).exp_u20();
      e.store(p[g] + i);
      sum = sum + e;
    }
    float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
    for (; i < n; ++i) {
      p[g][i] = std::exp(p[g][i] - mx);
      total += p[g][i];
    }
    m[g] = mx;
    l[g] = total;
  }
  Vec out[kMaxG][W];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t j = 0; j < W; ++j) out[g][j] = Vec(0.f);
  }
  for (int64_t i = 0; i < n; ++i) {
    load_row<D>(v + slots[i] * slot_stride, row);
    for (int64_t g = 0; g < G; ++g) {
      const Vec w(p[g][i]);
      for (int64_t j = 0; j < W; ++j) out[g][j] = at::vec::fmadd(w, row[j], out[g][j]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t j = 0; j < W; ++j) out[g][j].store(acc + g * D + j * Vec::size());
  }
}

template <typename KV, typename QT, int64_t D>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mask, int64_t mask_row_stride,
         int64_t mask_stride, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), Hkv = k.size(1), S = k.size(2), G = H / Hkv;
  const int64_t n_chunks = (S + kChunk - 1) / kChunk;
  const int64_t tasks = B * Hkv * n_chunks;
  std::vector<float> qf(B * H * D), m(tasks * G), l(tasks * G), acc(tasks * G * D);
  const QT* qd = q.data_ptr<QT>();
  for (int64_t b = 0; b < B; ++b) {  // q, scaled, as float32 [B, H, D]
    for (int64_t h = 0; h < H; ++h) {
      const QT* src = qd + b * q.stride(0) + h * q.stride(1);
      for (int64_t d = 0; d < D; ++d) qf[(b * H + h) * D + d] = static_cast<float>(src[d * q.stride(3)]) * scale;
    }
  }
  const KV* kd = k.data_ptr<KV>();
  const KV* vd = v.data_ptr<KV>();
  const int64_t kb = k.stride(0), kh = k.stride(1), ks = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % n_chunks, h = (t / n_chunks) % Hkv, b = t / (n_chunks * Hkv);
      const int64_t s0 = c * kChunk, s1 = std::min(S, s0 + kChunk);
      attend_chunk<KV, D>(qf.data() + (b * H + h * G) * D, kd + b * kb + h * kh, vd + b * vb + h * vh, ks,
                          mask == nullptr ? nullptr : mask + b * mask_row_stride, mask_stride, s0, s1, G,
                          m.data() + t * G, l.data() + t * G, acc.data() + t * G * D);
    }
  });
  // Merge the chunks of each (row, query head) into out [B, H, 1, D] (contiguous).
  QT* od = out.data_ptr<QT>();
  float o[D];
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t t0 = (b * Hkv + h) * n_chunks;
      for (int64_t g = 0; g < G; ++g) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < n_chunks; ++c) mx = std::max(mx, m[(t0 + c) * G + g]);
        std::fill(o, o + D, 0.f);
        float total = 0.f;
        for (int64_t c = 0; c < n_chunks; ++c) {
          const int64_t i = (t0 + c) * G + g;
          if (l[i] == 0.f) continue;  // no visible slot in this chunk (its max is -inf)
          const float w = std::exp(m[i] - mx);
          total += w * l[i];
          const float* a = acc.data() + i * D;
          for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
        }
        QT* dst = od + (b * H + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<QT>(total > 0.f ? o[d] / total : 0.f);
      }
    }
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be [B, H, 1, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              "decode_attention: q must be bfloat16 or float32");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides(),
              "decode_attention: k and v must be [B, Hkv, S, D] with the same strides");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kBFloat16 ||
                                                       k.scalar_type() == at::kHalf || k.scalar_type() == at::kFloat),
              "decode_attention: k and v must both be bfloat16, float16 or float32");
  TORCH_CHECK(k.stride(3) == 1, "decode_attention: k and v must be contiguous in the head dim");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0 && H / Hkv <= kMaxG &&
                  (D == 16 || D == 32 || D == 64 || D == 128),
              "decode_attention: shapes do not match (q ", q.sizes(), ", k ", k.sizes(), ")");
  const bool* mask_ptr = nullptr;
  int64_t mask_row_stride = 0, mask_stride = 0;
  if (mask.has_value()) {
    const at::Tensor& mt = *mask;
    TORCH_CHECK(mt.scalar_type() == at::kBool && mt.dim() == 4 && mt.size(1) == 1 && mt.size(2) == 1 &&
                    mt.size(3) == S && (mt.size(0) == 1 || mt.size(0) == B),
                "decode_attention: mask must be bool [B|1, 1, 1, S]");
    mask_ptr = mt.data_ptr<bool>();
    mask_row_stride = mt.size(0) == 1 ? 0 : mt.stride(0);
    mask_stride = mt.stride(3);
  }
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const at::ScalarType kv_type = k.scalar_type();
  const bool q_bf16 = q.scalar_type() == at::kBFloat16;
  auto go = [&](auto kv, auto qt, auto head_dim) {
    run<decltype(kv), decltype(qt), decltype(head_dim)::value>(q, k, v, mask_ptr, mask_row_stride, mask_stride,
                                                               static_cast<float>(scale), out);
  };
  auto with_kv = [&](auto qt, auto head_dim) {
    if (kv_type == at::kBFloat16) go(c10::BFloat16{}, qt, head_dim);
    else if (kv_type == at::kHalf) go(c10::Half{}, qt, head_dim);
    else go(float{}, qt, head_dim);
  };
  auto with_q = [&](auto head_dim) { q_bf16 ? with_kv(c10::BFloat16{}, head_dim) : with_kv(float{}, head_dim); };
  switch (D) {
    case 16: with_q(std::integral_constant<int64_t, 16>{}); break;
    case 32: with_q(std::integral_constant<int64_t, 32>{}); break;
    case 64: with_q(std::integral_constant<int64_t, 64>{}); break;
    default: with_q(std::integral_constant<int64_t, 128>{});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(lmstack, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmstack, CPU, m) { m.impl("decode_attention", &decode_attention); }
