// y = x @ (w * scale[:, None]).T for a few rows x (a decode step, a batch of them, a
// speculative verify): int8 weights streamed from memory as fast as they will come.
//
// A decode step reads every weight once, so its matmuls are bound by how fast the weights
// stream from memory. PyTorch's int8 kernel (_weight_int8pack_mm) read GPT-2 small's
// matrices at ~30 GB/s from memory, on a machine that sums a large buffer at ~75 GB/s,
// though at 71-81 GB/s once they sat in cache: the loss was in the streaming, not the
// arithmetic. Here the weight is stored in the order it is read -- blocks of R = 4 rows,
// each cut into C = 64-byte columns, (N/R, K/C, R, C) -- so each thread reads one
// contiguous stretch front to back, prefetching ahead: ~50 GB/s on the same matrices.
// Up to MB_MAX rows of x share each weight once it is widened to fp32.
//
// M = rows of x, N = out features (a multiple of R: pocketlm pads), K = in features (a
// multiple of C). x is converted to fp32; the products accumulate in fp32, per lane, in
// the same order for a row whatever other rows share the call.
// AVX-512 (F + BW) only; pocketlm uses PyTorch's kernel on other CPUs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t R = 4;             // weight rows read together
constexpr int64_t C = 64;            // bytes of a row read at a time: one cache line
constexpr int64_t PREFETCH = 4096;   // bytes ahead of the read position, fetched into L2
constexpr int64_t MB_MAX = 4;        // rows of x that share each widened weight

// 16 int8 -> 16 fp32
inline __m512 widen(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }

// Dot products of MB fp32 rows of x (K each, `ldx` apart) with the R weight rows of one
// packed block: out[m * R + r]. Each 64 weights are widened to fp32 once for all MB rows.
template <int64_t MB>
inline void dot_block(const float* x, int64_t ldx, const int8_t* block, int64_t K, float* out) {
  __m512 acc[MB][R];
  for (int64_t m = 0; m < MB; ++m)
    for (int64_t r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int8_t* p = block;
  for (int64_t k = 0; k < K; k += C, p += R * C) {
    for (int64_t r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(p + r * C + PREFETCH), _MM_HINT_T1);
      const __m512i q = _mm512_loadu_si512(p + r * C);  // 64 weights of row r
      const __m512 w[4] = {widen(_mm512_castsi512_si128(q)), widen(_mm512_extracti32x4_epi32(q, 1)),
                           widen(_mm512_extracti32x4_epi32(q, 2)), widen(_mm512_extracti32x4_epi32(q, 3))};
      for (int64_t m = 0; m < MB; ++m)
        for (int64_t j = 0; j < 4; ++j)
          acc[m][r] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(x + m * ldx + k + 16 * j), acc[m][r]);
    }
  }
  for (int64_t m = 0; m < MB; ++m)
    for (int64_t r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// x (M, K) float, packed (N/R, K/C, R, C) int8, scale (n,) fp32 -> y (M, n) fp32, the
// n <= N rows before the padding.
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                     int64_t n) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 4 && packed.size(2) == R && packed.size(3) == C,
              "int8_gemv: x (M, K) and a packed (N/4, K/64, 4, 64) weight expected");
  TORCH_CHECK(packed.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) * C == K && scale.numel() == n && n <= blocks * R && n > blocks * R - R);
  const at::Tensor w = packed.contiguous(), s = scale.contiguous();
  at::Tensor y = at::empty({M, n}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float out[MB_MAX * R];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m = 0; m < M;) {  // MB_MAX rows at a time, then one by one
        const int64_t rows = M - m >= MB_MAX ? MB_MAX : 1;
        if (rows == MB_MAX)
          dot_block<MB_MAX>(xp + m * K, K, wp + b * R * K, K, out);
        else
          dot_block<1>(xp + m * K, K, wp + b * R * K, K, out);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t r = 0; r < R && b * R + r < n; ++r)
            yp[(m + i) * n + b * R + r] = out[i * R + r] * sp[b * R + r];
        m += rows;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(pocketlm_kernels, m) {
  m.def("int8_gemv(Tensor x, Tensor packed, Tensor scale, int n) -> Tensor");
}
TORCH_LIBRARY_IMPL(pocketlm_kernels, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
