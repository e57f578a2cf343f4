// The matmuls of a decode step on GGUF-quantized weights kept in pocketlm's layouts
// (gguf_layouts.py), read as they are stored: y = x @ W.T for a few rows x.
//
// A weight is w = S * (c - offset) [+ min], c an unsigned code of 2..8 bits in planes, S a
// per-16/32 scale (see gguf_layouts.py). Each row of x is quantized to int8 per 32 values
// (x ~ dx * xq, dx = max|x| / 127, rounded to nearest even: llama.cpp's Q8_0), so a
// 64-weight chunk is one VNNI instruction per row of x: vpdpbusd sums c * xq four at a
// time into 16 int32 lanes, started at -offset * (sum of those 4 xq). The four weight
// rows' lanes are then summed across (exact, in int32) into one vector whose lanes are
// (16 weights, row), so one conversion and one fp32 multiply-add by S * dx serve all four
// rows; the scales are laid out in those lanes once per record. Mins add
// sum_b min_b * dx_b * sum(xq of block b) (per chunk for 32-weight types, per record for
// Q4_K/Q5_K). The result is dequantize(W) @ dequantize(xq) up to fp32 rounding of the sums.
// One core runs it at ~19-21 GB/s of Q4_K/Q6_K weights on this project's EPYC (Zen 4):
// about its share of the memory bandwidth, so the arithmetic per chunk is what decode
// speed hangs on (benchmarks/gguf_compute.py).
//
// Weights: codes (N/4, K/64, 4, code bytes) and records (N/4, K/group, 4, record bytes),
// four rows interleaved chunk by chunk, so each thread streams one contiguous stretch.
// Up to MB_MAX rows of x share each decoded chunk.
//
// Also here: quant_dequant (rows of such a matrix -> fp32/bf16, bit for bit gguf's: the
// prefill's tiles), gguf_repack (a matrix's GGUF blocks -> these layouts, as
// gguf_layouts.repack does, a block of four rows per task) and half_gemv (bf16/f16
// weights, fp32 activations).
// Needs AVX-512 F/BW + VNNI (pocketlm asks `quant_kernels_supported` first); compiled for
// them with the target pragma below, so the rest of the extension keeps its own flags.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")

namespace {

constexpr int64_t R = 4;           // weight rows interleaved
constexpr int64_t CHUNK = 64;      // weights of a row per code chunk
// Bytes ahead in the code stream, fetched into L1 (4096: one core read a 28672 x 4096
// Q4_K matrix from memory 1-20% faster than at 2048, five interleaved rounds, the best
// of 4 passes over 300 MB of copies; bf16/f16 rows keep 2048)
constexpr int64_t PREFETCH = 4096;
constexpr int64_t MB_MAX = 4;      // rows of x that share each decoded chunk

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// --- codes -------------------------------------------------------------------------------

// 64 codes of one plane of BITS bits, one per byte.
template <int BITS>
inline __m512i plane(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(p);
  } else if constexpr (BITS == 4) {  // byte j: codes j (low nibble) and j + 32
    // (a 256-bit broadcast and a masked 512-bit shift, one instruction fewer, ran Q4_K
    // and Q6_K 6-12% slower on Zen 4)
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    return _mm512_and_si512(w, _mm512_set1_epi8(0x0F));
  } else {  // 2 bits, byte j: codes j, j+16, j+32, j+48 at bits 0, 2, 4, 6
    const __m512i w = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i shift = _mm512_set_epi64(0x0006000600060006, 0x0006000600060006, 0x0004000400040004,
                                           0x0004000400040004, 0x0002000200020002, 0x0002000200020002, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(w, shift), _mm512_set1_epi8(3));
  }
}

// 64 codes: the low plane, then the high plane's bits above it.
template <int LOW, int HIGH>
inline __m512i codes64(const uint8_t* p) {
  __m512i c = plane<LOW>(p);
  if constexpr (HIGH == 1) {  // bit j of a little-endian uint64: code j's
    uint64_t bits;
    std::memcpy(&bits, p + 8 * LOW, 8);
    c = _mm512_mask_add_epi8(c, static_cast<__mmask64>(bits), c, _mm512_set1_epi8(1 << LOW));
  } else if constexpr (HIGH == 2) {  // 128-bit lane t's codes have theirs at bits 2t of each byte
    const __m512i h = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * LOW)));
    const __m512i to_low = _mm512_set_epi32(LOW - 6 + 32, LOW - 6 + 32, LOW - 6 + 32, LOW - 6 + 32, LOW - 4, LOW - 4,
                                            LOW - 4, LOW - 4, LOW - 2, LOW - 2, LOW - 2, LOW - 2, LOW, LOW, LOW, LOW);
    static_assert(LOW >= 4, "the high crumbs rotate left by LOW - 2t (mod 32)");
    // rotated to bits LOW, LOW + 1 of the byte (bits of neighbours land elsewhere and are
    // masked off), then or-ed into c: (h & mask) | c in one instruction
    c = _mm512_ternarylogic_epi32(_mm512_rolv_epi32(h, to_low), _mm512_set1_epi8(3 << LOW), c, 0xEA);
  }
  return c;
}

// --- scales ------------------------------------------------------------------------------

template <int SCHEME, int SUB, int MINS>
constexpr int64_t record_bytes() {
  if constexpr (SCHEME == 0) return MINS ? 8 : 4;
  return 2 + (MINS ? 2 : 0) + 256 / SUB + (MINS == 1 ? 256 / SUB : 0);
}

// A b32 chunk's scales [and mins] for its 4 rows at once: f16 (d0 d1 [m0 m1]) per row,
// row r's at lanes (2 or 4) r + j.
template <int MINS>
inline __m512 b32_records(const uint8_t* rec4) {
  if constexpr (MINS == 0) return _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec4))));
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec4)));
}

// The sums of 4 vectors' lanes -> out[0..3] (one reduction instead of four).
inline void reduce4(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a b a b
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
}

// --- x, quantized ----------------------------------------------------------------------

struct Xq {
  const int8_t* q;      // (M, Kp): x / dx, rounded
  const float* dx;      // (M, Kp/4): each VNNI lane's dx
  const int32_t* init;  // (M, Kp/4): -offset * the lane's sum of q, where its sum starts
  // For the mins, dx * a sum of q: (M, Kp/4) over each lane's 16 values, in all four lanes
  // of its 128 bits; or (M, Kp/8) over each 32 values, four times (`per32`, Q4_K/Q5_K).
  const float* sdx;
  int64_t kp;
};

// One row of x (K values) -> its Xq row (kp values, zero-padded), as the file's top says.
void quantize_row(const float* x, int64_t K, int64_t kp, int64_t offset, int8_t* q, float* dx, int32_t* init,
                  float* sdx, bool per32) {
  alignas(64) float tail[32];
  for (int64_t k0 = 0; k0 < kp; k0 += 32) {
    const float* src = x + k0;
    if (k0 + 32 > K) {  // the zero padding
      for (int64_t i = 0; i < 32; ++i) tail[i] = k0 + i < K ? x[k0 + i] : 0.0f;
      src = tail;
    }
    const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m512 vid = _mm512_set1_ps(id);  // cvtps rounds to nearest even (MXCSR default)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, vid))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k0 + 16), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, vid))));
    _mm256_storeu_ps(dx + k0 / 4, _mm256_set1_ps(d));
  }
  for (int64_t k0 = 0; k0 < kp; k0 += CHUNK) {  // sums of four, by VNNI against ones
    const __m512i s4 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_loadu_si512(q + k0));
    if (init) _mm512_storeu_si512(init + k0 / 4, _mm512_mullo_epi32(s4, _mm512_set1_epi32(-offset)));
    if (sdx) {  // each 128-bit lane: the sum of its 16 values, in all four of its lanes
      const __m512i s8 = _mm512_add_epi32(s4, _mm512_shuffle_epi32(s4, _MM_PERM_BADC));
      __m512i s = _mm512_add_epi32(s8, _mm512_shuffle_epi32(s8, _MM_PERM_CDAB));
      if (per32) s = _mm512_add_epi32(s, _mm512_shuffle_i32x4(s, s, _MM_PERM_CDAB));  // lanes 0, 2: the 32s
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(dx + k0 / 4));
      if (per32) {
        _mm_storeu_ps(sdx + k0 / 8, _mm512_castps512_ps128(v));
        _mm_storeu_ps(sdx + k0 / 8 + 4, _mm512_extractf32x4_ps(v, 2));
      } else {
        _mm512_storeu_ps(sdx + k0 / 4, v);
      }
    }
  }
}

// Rows of x (M, K) float -> Xq, its arrays in `buffer`.
Xq quantize_x(const at::Tensor& x, int64_t kp, int64_t offset, bool mins, bool per32, at::Tensor& buffer) {
  const int64_t M = x.size(0), K = x.size(1), lanes = M * kp / 4;
  buffer = at::empty({M * kp + 4 * lanes * (1 + (offset != 0) + mins)}, x.options().dtype(at::kByte));
  uint8_t* p = buffer.data_ptr<uint8_t>();
  float* dx = reinterpret_cast<float*>(p);
  int32_t* init = offset ? reinterpret_cast<int32_t*>(p + 4 * lanes) : nullptr;
  float* sdx = mins ? reinterpret_cast<float*>(p + 4 * lanes * (1 + (offset != 0))) : nullptr;
  int8_t* q = reinterpret_cast<int8_t*>(p + 4 * lanes * (1 + (offset != 0) + mins));
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantize_row(xp + m * K, K, kp, offset, q + m * kp, dx + m * kp / 4, init ? init + m * kp / 4 : nullptr,
                   sdx ? sdx + m * kp / (per32 ? 8 : 4) : nullptr, per32);
  });
  return {q, dx, init, sdx, kp};
}

// --- the decode matmul -------------------------------------------------------------------

struct Weights {
  const uint8_t* codes;    // (N/4, Kp/64, 4, CB)
  const uint8_t* records;  // (N/4, Kp/group, 4, RB)
  int64_t chunks;          // Kp / 64
  __m512i table;           // IQ4: the 16 values + 128, in every 128-bit lane
};

// The sums of 4 vectors' 128-bit lanes: lane l of the result holds a, b, c, d's sums of
// their lane l's four int32s, in that order (three unpack-add steps, no cross-lane moves).
inline __m512i reduce4_lanes(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}

// Row r's BYTES (8 or 16) bytes from record offset FIRST of a "k" record group (4 rows'
// records, RB bytes each), in 128-bit lane r.
template <int RB, int FIRST, int BYTES>
inline __m512i k_rows(const uint8_t* rec4) {
  const auto row = [&](int r) {
    const auto* at = reinterpret_cast<const __m128i*>(rec4 + r * RB + FIRST);
    return BYTES == 16 ? _mm_loadu_si128(at) : _mm_loadl_epi64(at);
  };
  __m512i z = _mm512_castsi128_si512(row(0));
  z = _mm512_inserti32x4(z, row(1), 1);
  z = _mm512_inserti32x4(z, row(2), 2);
  return _mm512_inserti32x4(z, row(3), 3);
}

// Bytes (r, i) -> (i, r): dword c of lane r goes to dword r of lane c, then in each lane
// byte 4r + l to 4l + r. Lane c then holds byte 4c + l of each row, row-minor.
inline __m512i k_transpose(__m512i z) {
  z = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
  return _mm512_shuffle_epi8(z, _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)));
}

// The 4 rows' f16 at record offset AT, as float32 in lanes (l, r): row r's in lane 4 l + r.
template <int RB, int AT>
inline __m512 k_halves(const uint8_t* rec4) {
  static_assert(RB % 2 == 0 && AT % 2 == 0 && 3 * RB + AT + 2 <= 64, "the f16s sit in the first 64 bytes");
  constexpr int BYTES = R * RB < 64 ? R * RB : 64;  // never read past the group
  const __m512i v = _mm512_maskz_loadu_epi8(BYTES == 64 ? ~0ULL : (1ULL << BYTES) - 1, rec4);
  const __m512i lane = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13,
                                        12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i at = _mm512_add_epi16(_mm512_mullo_epi16(_mm512_and_si512(lane, _mm512_set1_epi16(3)),
                                                         _mm512_set1_epi16(RB / 2)), _mm512_set1_epi16(AT / 2));
  return _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(at, v)));
}

// A "k" record group's scales S = d * sub for its 4 chunks, in the lanes (l, r) of a
// chunk's reduced sums (see dot_block): sc[c], lane 4 l + r = row r's scale of chunk c's
// 16 weights l. Mins: Q2_K's (per 16) as -dmin * min in the same lanes, mn[c]; Q4_K/Q5_K's
// (per 32) as integers in lanes (j, r), sub-blocks j = 0..3 in mn[0], 4..7 in mn[1]
// (applied once a record: their x sums are per record too).
template <int SUB, int MINS, int RB>
inline void k_scales(const uint8_t* rec4, __m512* sc, __m512* mn) {
  constexpr int FIRST = MINS ? 4 : 2;
  const __m512 d = k_halves<RB, 0>(rec4);
  if constexpr (SUB == 16) {  // lane c: sub-blocks 4c + l
    __m512i subs = k_transpose(k_rows<RB, FIRST, 16>(rec4));
    __m512i mins = _mm512_setzero_si512();
    __m512 dmin = _mm512_setzero_ps();
    if constexpr (MINS == 2) {  // Q2_K: scale | min << 4
      mins = _mm512_and_si512(_mm512_srli_epi16(subs, 4), _mm512_set1_epi8(15));
      subs = _mm512_and_si512(subs, _mm512_set1_epi8(15));
      dmin = _mm512_sub_ps(dmin, k_halves<RB, 2>(rec4));
    }
    sc[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(subs))));
    sc[1] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(subs, 1))));
    sc[2] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(subs, 2))));
    sc[3] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(subs, 3))));
    if constexpr (MINS == 2) {
      mn[0] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(mins))));
      mn[1] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(mins, 1))));
      mn[2] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(mins, 2))));
      mn[3] = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(mins, 3))));
    }
  } else {  // 8 scales then (MINS 1) 8 mins a row, read together: lanes 0, 1 scales j, 2, 3 mins
    const __m512i z = k_transpose(k_rows<RB, FIRST, MINS == 1 ? 16 : 8>(rec4));
    const __m512 lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(z))));
    const __m512 hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(z, 1))));
    sc[0] = _mm512_shuffle_f32x4(lo, lo, 0x50);  // lanes j = 0, 0, 1, 1
    sc[1] = _mm512_shuffle_f32x4(lo, lo, 0xFA);  // 2, 2, 3, 3
    sc[2] = _mm512_shuffle_f32x4(hi, hi, 0x50);
    sc[3] = _mm512_shuffle_f32x4(hi, hi, 0xFA);
    if constexpr (MINS == 1) {
      mn[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(z, 2)));
      mn[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(z, 3)));
    }
  }
}

// Dot products of MB quantized rows of x (from m0) with the 4 weight rows of block b:
// out[m * R + r]. Per chunk, each row's VNNI sums (16 lanes of 4 weights) are reduced
// across the 4 rows first (reduce4_lanes: lane (l, r), l the 16 weights, r the row), so
// one conversion and one multiply-add scale all four rows: the scales S * dx and the
// mins are laid out in those lanes once per record.
template <int LOW, int HIGH, int SCHEME, int SUB, int MINS, bool TABLE, int MB>
inline void dot_block(const Xq& x, int64_t m0, const Weights& w, int64_t b, float* out) {
  constexpr int64_t CB = 8 * (LOW + HIGH), RB = record_bytes<SCHEME, SUB, MINS>();
  constexpr int64_t PER_RECORD = SCHEME == 0 ? 1 : 4;  // chunks per record
  constexpr bool OFFSET = MINS == 0;  // every layout has an offset or mins, never both
  const uint8_t* codes = w.codes + b * w.chunks * R * CB;
  const uint8_t* recs = w.records + b * (w.chunks / PER_RECORD) * R * RB;
  // b32 records: row r's f16 d0 d1 [m0 m1] at lanes (2 or 4) r + j; lane (l, r) wants
  // row r's 32-block l / 2.
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i row = _mm512_and_si512(lane, _mm512_set1_epi32(3)), half = _mm512_srli_epi32(lane, 3);
  const __m512i d_at = _mm512_add_epi32(_mm512_mullo_epi32(row, _mm512_set1_epi32(MINS ? 4 : 2)), half);
  const __m512i m_at = _mm512_add_epi32(d_at, _mm512_set1_epi32(2));
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.chunks / PER_RECORD; ++g) {
    __m512 sc[PER_RECORD], mn[PER_RECORD];
    if constexpr (SCHEME == 1) k_scales<SUB, MINS, RB>(recs + g * R * RB, sc, mn);
    if constexpr (SCHEME == 1 && MINS == 1) {  // sum_j min_rj * dx_j * sum(xq_j) * -dmin_r, once a record
      const __m512 dmin = k_halves<RB, 2>(recs + g * R * RB);
      for (int m = 0; m < MB; ++m) {
        const float* sdx = x.sdx + (m0 + m) * x.kp / 8 + g * 32;
        const __m512 t = _mm512_fmadd_ps(mn[0], _mm512_loadu_ps(sdx), _mm512_mul_ps(mn[1], _mm512_loadu_ps(sdx + 16)));
        acc[m] = _mm512_fnmadd_ps(t, dmin, acc[m]);
      }
    }
    for (int64_t c = 0; c < PER_RECORD; ++c) {
      const int64_t ch = g * PER_RECORD + c;
      const uint8_t* p = codes + ch * R * CB;
      for (int64_t line = 0; line < R * CB; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH + line), _MM_HINT_T0);
      __m512i q[R];
      for (int64_t r = 0; r < R; ++r) {
        q[r] = codes64<LOW, HIGH>(p + r * CB);
        if constexpr (TABLE) q[r] = _mm512_shuffle_epi8(w.table, q[r]);
      }
      __m512 s, mv = _mm512_setzero_ps();
      if constexpr (SCHEME == 0) {
        const __m512 b32 = b32_records<MINS>(recs + ch * R * RB);
        s = _mm512_permutexvar_ps(d_at, b32);
        if constexpr (MINS != 0) mv = _mm512_permutexvar_ps(m_at, b32);
      } else {
        s = sc[c];
        if constexpr (MINS == 2) mv = mn[c];
      }
      for (int m = 0; m < MB; ++m) {
        const int64_t at = (m0 + m) * x.kp + ch * CHUNK;
        const __m512i xq = _mm512_loadu_si512(x.q + at);
        const __m512i start = OFFSET ? _mm512_loadu_si512(x.init + at / 4) : _mm512_setzero_si512();
        const __m512i sum = reduce4_lanes(_mm512_dpbusd_epi32(start, q[0], xq), _mm512_dpbusd_epi32(start, q[1], xq),
                                          _mm512_dpbusd_epi32(start, q[2], xq), _mm512_dpbusd_epi32(start, q[3], xq));
        const __m512 scale = _mm512_mul_ps(s, _mm512_loadu_ps(x.dx + at / 4));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[m]);
        if constexpr (MINS != 0 && !(SCHEME == 1 && MINS == 1))
          acc[m] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(x.sdx + at / 4), acc[m]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {  // lane (l, r) summed over l
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(acc[m]), _mm512_extractf32x8_ps(acc[m], 1));
    _mm_storeu_ps(out + m * R, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
}

template <int LOW, int HIGH, int SCHEME, int SUB, int MINS, bool TABLE>
void run_gemv(const Xq& x, int64_t M, const Weights& w, int64_t blocks, int64_t n, float* y) {
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    float out[MB_MAX * R];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t m = 0; m < M;) {  // MB_MAX rows at a time, then the rest together
        const int64_t rows = std::min(M - m, MB_MAX);
        if (rows == 4) dot_block<LOW, HIGH, SCHEME, SUB, MINS, TABLE, 4>(x, m, w, b, out);
        if (rows == 3) dot_block<LOW, HIGH, SCHEME, SUB, MINS, TABLE, 3>(x, m, w, b, out);
        if (rows == 2) dot_block<LOW, HIGH, SCHEME, SUB, MINS, TABLE, 2>(x, m, w, b, out);
        if (rows == 1) dot_block<LOW, HIGH, SCHEME, SUB, MINS, TABLE, 1>(x, m, w, b, out);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t r = 0; r < R && b * R + r < n; ++r) y[(m + i) * n + b * R + r] = out[i * R + r];
        m += rows;
      }
    }
  });
}

// --- dequantization of rows (the prefill's tiles) ----------------------------------------

inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(at::BFloat16* out, __m512 v) {  // round to nearest even, as torch does
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}

// Weight row `row` -> out[0..k): gguf's float32 operations in gguf's order.
template <int LOW, int HIGH, int SCHEME, int SUB, int MINS, bool TABLE, typename T>
void dequant_row(const Weights& w, int64_t offset, int64_t row, int64_t k, T* out) {
  constexpr int64_t CB = 8 * (LOW + HIGH), RB = record_bytes<SCHEME, SUB, MINS>();
  constexpr int64_t PER_RECORD = SCHEME == 0 ? 1 : 4, SUBS = SCHEME == 0 ? 2 : 256 / SUB;
  const int64_t b = row / R, r = row % R, groups = w.chunks / PER_RECORD;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* rec = w.records + ((b * groups + g) * R + r) * RB;
    float scale[SUBS], low[SUBS];
    for (int64_t j = 0; j < SUBS; ++j) {
      if constexpr (SCHEME == 0) {
        scale[j] = half_at(rec + 2 * j);
        low[j] = MINS ? half_at(rec + 4 + 2 * j) : 0.0f;
      } else {
        const uint8_t* s = rec + (MINS ? 4 : 2);
        const int sub = MINS == 2 ? s[j] & 15 : static_cast<int8_t>(s[j]);
        const int mn = MINS == 2 ? s[j] >> 4 : MINS == 1 ? s[SUBS + j] : 0;
        scale[j] = half_at(rec) * static_cast<float>(sub);
        low[j] = MINS ? half_at(rec + 2) * static_cast<float>(mn) : 0.0f;
      }
    }
    for (int64_t c = 0; c < PER_RECORD; ++c) {
      const int64_t ch = g * PER_RECORD + c;
      __m512i q = codes64<LOW, HIGH>(w.codes + ((b * w.chunks + ch) * R + r) * CB);
      if constexpr (TABLE) q = _mm512_shuffle_epi8(w.table, q);
      for (int64_t t = 0; t < 4 && ch * CHUNK + 16 * t < k; ++t) {
        const int64_t j = SCHEME == 0 ? t / 2 : SUB == 16 ? 4 * c + t : 2 * c + t / 2;
        __m512i ci = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 0));
        if (t == 1) ci = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 1));
        if (t == 2) ci = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 2));
        if (t == 3) ci = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q, 3));
        __m512 v;
        if constexpr (MINS == 0) {
          v = _mm512_mul_ps(_mm512_set1_ps(scale[j]), _mm512_cvtepi32_ps(_mm512_sub_epi32(ci, _mm512_set1_epi32(offset))));
        } else if constexpr (SCHEME == 0) {  // d * q + m
          v = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(scale[j]), _mm512_cvtepi32_ps(ci)), _mm512_set1_ps(low[j]));
        } else {  // (d * sub) * q - dmin * min
          v = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(scale[j]), _mm512_cvtepi32_ps(ci)), _mm512_set1_ps(low[j]));
        }
        store16(out + ch * CHUNK + 16 * t, v);
      }
    }
  }
}

template <int LOW, int HIGH, int SCHEME, int SUB, int MINS, bool TABLE>
void run_dequant(const Weights& w, int64_t offset, int64_t row0, int64_t rows, int64_t k, at::Tensor& out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (out.scalar_type() == at::kFloat)
        dequant_row<LOW, HIGH, SCHEME, SUB, MINS, TABLE>(w, offset, row0 + i, k, out.data_ptr<float>() + i * k);
      else
        dequant_row<LOW, HIGH, SCHEME, SUB, MINS, TABLE>(w, offset, row0 + i, k, out.data_ptr<at::BFloat16>() + i * k);
    }
  });
}

// --- the layouts pocketlm uses, and the ops --------------------------------------------

struct Layout {
  int64_t low, high, scheme, sub, mins, offset, table;
};

Layout read_layout(at::IntArrayRef p) {
  TORCH_CHECK(p.size() == 7 && (p[5] != 0) == (p[4] == 0),
              "quant kernels: layout [low, high, scheme, sub, mins, offset, table], an offset or mins");
  return {p[0], p[1], p[2], p[3], p[4], p[5], p[6]};
}

using GemvFn = void (*)(const Xq&, int64_t, const Weights&, int64_t, int64_t, float*);
using DequantFn = void (*)(const Weights&, int64_t, int64_t, int64_t, int64_t, at::Tensor&);

template <typename F>
F pick(const Layout& l, F (*choose)(int)) {
  // The thirteen GGUF types' layouts (gguf_layouts.LAYOUTS), in that order; the last
  // field names the value table (1 IQ4, 2 MXFP4), the one thing telling MXFP4 from IQ4_NL.
  static const int64_t known[13][6] = {{4, 0, 0, 32, 0, 0}, {4, 0, 0, 32, 1, 0}, {4, 0, 0, 32, 0, 1},
                                       {4, 1, 0, 32, 0, 0}, {4, 1, 0, 32, 1, 0}, {8, 0, 0, 32, 0, 0},
                                       {2, 0, 1, 16, 2, 0}, {2, 1, 1, 16, 0, 0}, {4, 0, 1, 32, 1, 0},
                                       {4, 1, 1, 32, 1, 0}, {4, 2, 1, 16, 0, 0}, {4, 0, 1, 32, 0, 1},
                                       {4, 0, 0, 32, 0, 2}};
  for (int i = 0; i < 13; ++i) {
    const int64_t* k = known[i];
    if (l.low == k[0] && l.high == k[1] && l.scheme == k[2] && l.sub == k[3] && l.mins == k[4] && l.table == k[5])
      return choose(i);
  }
  TORCH_CHECK(false, "quant kernels: a layout pocketlm does not have");
}

#define LAYOUT_CASES(FN)                   \
  switch (i) {                             \
    case 0: return &FN<4, 0, 0, 32, 0, false>; \
    case 1: return &FN<4, 0, 0, 32, 1, false>; \
    case 2: return &FN<4, 0, 0, 32, 0, true>;  \
    case 3: return &FN<4, 1, 0, 32, 0, false>; \
    case 4: return &FN<4, 1, 0, 32, 1, false>; \
    case 5: return &FN<8, 0, 0, 32, 0, false>; \
    case 6: return &FN<2, 0, 1, 16, 2, false>; \
    case 7: return &FN<2, 1, 1, 16, 0, false>; \
    case 8: return &FN<4, 0, 1, 32, 1, false>; \
    case 9: return &FN<4, 1, 1, 32, 1, false>; \
    case 10: return &FN<4, 2, 1, 16, 0, false>; \
    case 11: return &FN<4, 0, 1, 32, 0, true>;  \
    default: return &FN<4, 0, 0, 32, 0, true>; /* MXFP4: IQ4_NL's kernel, its own table */ \
  }

GemvFn gemv_for(int i) { LAYOUT_CASES(run_gemv) }
DequantFn dequant_for(int i) { LAYOUT_CASES(run_dequant) }

Weights read_weights(const at::Tensor& codes, const at::Tensor& records, const c10::optional<at::Tensor>& table,
                     const Layout& l) {
  TORCH_CHECK(codes.dim() == 4 && records.dim() == 4 && codes.size(2) == R && records.size(2) == R &&
                  codes.scalar_type() == at::kByte && records.scalar_type() == at::kByte &&
                  codes.is_contiguous() && records.is_contiguous() && codes.size(0) == records.size(0) &&
                  codes.size(3) == 8 * (l.low + l.high),
              "quant kernels: codes (N/4, K/64, 4, bytes) and records (N/4, K/group, 4, bytes) uint8 expected");
  TORCH_CHECK(codes.size(1) == records.size(1) * (l.scheme == 0 ? 1 : 4), "quant kernels: codes and records disagree on K");
  Weights w{codes.data_ptr<uint8_t>(), records.data_ptr<uint8_t>(), codes.size(1), _mm512_setzero_si512()};
  if (l.table) {
    TORCH_CHECK(table.has_value() && table->numel() == 16 && table->scalar_type() == at::kByte, "quant kernels: a 16-byte table");
    w.table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table->contiguous().data_ptr<uint8_t>())));
  }
  return w;
}

// x (M, K<=Kp) float -> (M, n) fp32 = x_q8 @ W.T, W the n <= N rows of the packed matrix.
at::Tensor quant_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& records,
                      const c10::optional<at::Tensor>& table, at::IntArrayRef layout, int64_t n) {
  const Layout l = read_layout(layout);
  const Weights w = read_weights(codes, records, table, l);
  const int64_t kp = w.chunks * CHUNK, blocks = codes.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= kp && x.size(1) > kp - (l.scheme == 0 ? 64 : 256),
              "quant_gemv: x (M, K) with K the matrix's width");
  TORCH_CHECK(n <= blocks * R && n > blocks * R - R, "quant_gemv: n does not match the packed rows");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor buffer;
  const Xq xq = quantize_x(xf, kp, l.offset, l.mins != 0, l.scheme == 1 && l.mins == 1, buffer);
  at::Tensor y = at::empty({M, n}, xf.options());
  pick<GemvFn>(l, gemv_for)(xq, M, w, blocks, n, y.data_ptr<float>());
  return y;
}

// Rows [row0, row0 + rows) of the packed matrix, K = k -> (rows, k) float32 or bfloat16.
at::Tensor quant_dequant(const at::Tensor& codes, const at::Tensor& records, const c10::optional<at::Tensor>& table,
                         at::IntArrayRef layout, int64_t row0, int64_t rows, int64_t k, bool bf16) {
  const Layout l = read_layout(layout);
  const Weights w = read_weights(codes, records, table, l);
  TORCH_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= codes.size(0) * R && k % 16 == 0 && k <= w.chunks * CHUNK,
              "quant_dequant: rows or width outside the matrix");
  at::Tensor out = at::empty({rows, k}, codes.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  pick<DequantFn>(l, dequant_for)(w, l.offset, row0, rows, k, out);
  return out;
}

// --- GGUF blocks -> these layouts (gguf_layouts.repack, byte for byte) -------------------

// The thirteen GGUF types, in pick's order: bytes of a block in the file.
constexpr int64_t BLOCK_BYTES[13] = {18, 20, 18, 22, 24, 34, 84, 110, 144, 176, 210, 136, 17};
enum Kind { Q4_0, Q4_1, IQ4_NL, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, MXFP4 };

// MXFP4's E8M0 scale byte e -> the f16 bits of 2^(e - 128) (see gguf_layouts.py): exact
// from 2^-24 to 2^15, zero below; gguf_layouts.repack refuses a file with larger ones.
inline uint16_t e8m0_half_f16(uint8_t e) {
  const int x = e - 128;
  if (x >= -14) return static_cast<uint16_t>((x + 15) << 10);
  return x >= -24 ? static_cast<uint16_t>(1 << (x + 24)) : 0;
}

// One 32-weight block -> its 32 codes, in weight order; its f16 d (and m) bytes.
template <int KIND>
inline __m256i b32_block(const uint8_t* p, uint8_t* d, uint8_t* m) {
  if constexpr (KIND == MXFP4) {
    const uint16_t bits = e8m0_half_f16(p[0]);
    std::memcpy(d, &bits, 2);
  } else {
    std::memcpy(d, p, 2);
  }
  if constexpr (KIND == Q8_0) {  // c = q + 128
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
    return _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80)));
  }
  constexpr int QS = KIND == Q4_1 ? 4 : KIND == Q5_0 ? 6 : KIND == Q5_1 ? 8 : KIND == MXFP4 ? 1 : 2;
  if constexpr (KIND == Q4_1 || KIND == Q5_1) std::memcpy(m, p + 2, 2);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + QS)), mask = _mm_set1_epi8(15);
  __m256i c = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), mask), _mm_and_si128(q, mask));
  if constexpr (KIND == Q5_0 || KIND == Q5_1) {  // a little-endian uint32 of fifth bits
    uint32_t qh;
    std::memcpy(&qh, p + QS - 4, 4);
    c = _mm256_mask_add_epi8(c, qh, c, _mm256_set1_epi8(16));
  }
  return c;
}

// Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> 8 scales then 8 mins.
inline void k_scale_min(const uint8_t* s, uint8_t* out) {
  for (int j = 0; j < 4; ++j) {
    out[j] = s[j] & 63;
    out[4 + j] = (s[8 + j] & 15) | ((s[j] >> 2) & 0x30);
    out[8 + j] = s[4 + j] & 63;
    out[12 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
  }
}

// 32 x 4 codes of 2 bits: code 32 s + l is bits 2s of byte l.
inline void crumbs128(const uint8_t* q, uint8_t* c) {
  for (int s = 0; s < 4; ++s)
    for (int l = 0; l < 32; ++l) c[32 * s + l] = (q[l] >> (2 * s)) & 3;
}

// One 256-weight super-block -> its 256 codes, in weight order, and its record.
template <int KIND>
inline void k_block(const uint8_t* p, uint8_t* c, uint8_t* rec) {
  if constexpr (KIND == Q2_K) {  // record: d, dmin, the 16 scale|min<<4 bytes
    for (int h = 0; h < 2; ++h) crumbs128(p + 16 + 32 * h, c + 128 * h);
    std::memcpy(rec, p + 80, 4);
    std::memcpy(rec + 4, p, 16);
  } else if constexpr (KIND == Q3_K) {  // record: d, 16 int8 scales (6 bits - 32)
    for (int h = 0; h < 2; ++h) crumbs128(p + 32 + 32 * h, c + 128 * h);
    for (int s = 0; s < 8; ++s)
      for (int l = 0; l < 32; ++l) c[32 * s + l] |= ((p[l] >> s) & 1) << 2;
    std::memcpy(rec, p + 108, 2);
    for (int i = 0; i < 16; ++i) {
      const int lo = (p[96 + i % 8] >> (4 * (i / 8))) & 15, hi = (p[104 + i % 4] >> (2 * (i / 4))) & 3;
      rec[2 + i] = static_cast<uint8_t>((lo | hi << 4) - 32);
    }
  } else if constexpr (KIND == Q6_K) {  // record: d, 16 int8 scales
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < 64; ++l) {
        c[128 * h + l] = p[64 * h + l] & 15;
        c[128 * h + 64 + l] = p[64 * h + l] >> 4;
      }
      for (int s = 0; s < 4; ++s)
        for (int l = 0; l < 32; ++l) c[128 * h + 32 * s + l] |= ((p[128 + 32 * h + l] >> (2 * s)) & 3) << 4;
    }
    std::memcpy(rec, p + 208, 2);
    std::memcpy(rec + 2, p + 192, 16);
  } else if constexpr (KIND == IQ4_XS) {  // record: d, 8 int8 scales (6 bits - 32)
    for (int i = 0; i < 8; ++i)
      for (int l = 0; l < 16; ++l) {
        c[32 * i + l] = p[8 + 16 * i + l] & 15;
        c[32 * i + 16 + l] = p[8 + 16 * i + l] >> 4;
      }
    const int h = p[2] | p[3] << 8;
    std::memcpy(rec, p, 2);
    for (int j = 0; j < 8; ++j)
      rec[2 + j] = static_cast<uint8_t>((((p[4 + j / 2] >> (4 * (j % 2))) & 15) | ((h >> (2 * j)) & 3) << 4) - 32);
  } else {  // Q4_K, Q5_K -- record: d, dmin, 8 scales, 8 mins
    constexpr int QS = KIND == Q5_K ? 48 : 16;
    for (int i = 0; i < 4; ++i)
      for (int l = 0; l < 32; ++l) {
        c[64 * i + l] = p[QS + 32 * i + l] & 15;
        c[64 * i + 32 + l] = p[QS + 32 * i + l] >> 4;
      }
    if constexpr (KIND == Q5_K)
      for (int s = 0; s < 8; ++s)
        for (int l = 0; l < 32; ++l) c[32 * s + l] |= ((p[16 + l] >> s) & 1) << 4;
    std::memcpy(rec, p, 4);
    k_scale_min(p + 4, rec + 4);
  }
}

// The low 2 bits of 64 codes -> 16 bytes, byte j holding codes j, j+16, j+32, j+48 at
// bits 0, 2, 4, 6 (each 128-bit lane shifted by its own amount, then the lanes or-ed).
inline __m128i crumbs(__m512i c) {
  const __m512i shift = _mm512_set_epi64(0x0006000600060006, 0x0006000600060006, 0x0004000400040004,
                                         0x0004000400040004, 0x0002000200020002, 0x0002000200020002, 0, 0);
  const __m512i m = _mm512_sllv_epi16(_mm512_and_si512(c, _mm512_set1_epi8(3)), shift);
  const __m256i h = _mm256_or_si256(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64(m, 1));
  return _mm_or_si128(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// 64 codes -> the chunk's planes (see gguf_layouts.py): low bits, then high bits.
template <int LOW, int HIGH>
inline void pack_chunk(__m512i c, uint8_t* out) {
  if constexpr (LOW == 8) {
    _mm512_storeu_si512(out, c);
  } else if constexpr (LOW == 4) {  // byte j: codes j and j + 32
    const __m512i m = _mm512_and_si512(c, _mm512_set1_epi8(15));
    const __m256i v = _mm256_or_si256(_mm512_castsi512_si256(m), _mm256_slli_epi16(_mm512_extracti64x4_epi64(m, 1), 4));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), crumbs(c));
  }
  if constexpr (HIGH == 1) {  // bit j of a little-endian uint64: code j's
    const uint64_t bits = _mm512_test_epi8_mask(c, _mm512_set1_epi8(1 << LOW));
    std::memcpy(out + 8 * LOW, &bits, 8);
  } else if constexpr (HIGH == 2) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8 * LOW), crumbs(_mm512_srli_epi16(c, LOW)));
  }
}

// Row blocks [begin, end) of the (n, k) matrix in `raw` -> their codes and records; rows
// past n, and a 32-weight type's missing last block, are zeros.
template <int KIND>
void repack_blocks(const uint8_t* raw, int64_t n, int64_t k, int64_t begin, int64_t end, uint8_t* codes,
                   uint8_t* records) {
  constexpr int64_t SCHEME = KIND >= Q2_K && KIND <= IQ4_XS, BB = BLOCK_BYTES[KIND], GROUP = SCHEME ? 256 : 64;
  constexpr int64_t LOW = KIND == Q8_0 ? 8 : KIND == Q2_K || KIND == Q3_K ? 2 : 4;
  constexpr int64_t HIGH = KIND == Q5_0 || KIND == Q5_1 || KIND == Q3_K || KIND == Q5_K ? 1 : KIND == Q6_K ? 2 : 0;
  constexpr int64_t CB = 8 * (LOW + HIGH);
  constexpr int64_t RB = SCHEME ? (KIND == Q3_K || KIND == Q6_K ? 18 : KIND == IQ4_XS ? 10 : 20)
                                : (KIND == Q4_1 || KIND == Q5_1 ? 8 : 4);
  const int64_t blocks = k / (SCHEME ? 256 : 32), groups = (k + GROUP - 1) / GROUP, chunks = groups * GROUP / CHUNK;
  alignas(64) uint8_t c[256];
  uint8_t rec[RB];
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = b * R + r;
      const uint8_t* p = raw + std::min(row, n - 1) * blocks * BB;  // read only if row < n
      uint8_t* out = codes + (b * chunks * R + r) * CB;  // chunk ch at out + ch * R * CB
      for (int64_t g = 0; g < groups; ++g) {
        std::memset(rec, 0, RB);
        if constexpr (SCHEME) {
          if (row < n) k_block<KIND>(p + g * BB, c, rec);
          else std::memset(c, 0, 256);
          for (int64_t t = 0; t < 4; ++t) pack_chunk<LOW, HIGH>(_mm512_load_si512(c + CHUNK * t), out + (4 * g + t) * R * CB);
        } else {  // two 32-blocks: record d0 d1 [m0 m1]
          __m256i lo = _mm256_setzero_si256(), hi = lo;
          if (row < n) lo = b32_block<KIND>(p + 2 * g * BB, rec, rec + 4);
          if (row < n && 2 * g + 1 < blocks) hi = b32_block<KIND>(p + (2 * g + 1) * BB, rec + 2, rec + 6);
          pack_chunk<LOW, HIGH>(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), out + g * R * CB);
        }
        std::memcpy(records + ((b * groups + g) * R + r) * RB, rec, RB);
      }
    }
  }
}

using RepackFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, uint8_t*, uint8_t*);

RepackFn repack_for(int i) {
  static const RepackFn fns[13] = {&repack_blocks<Q4_0>, &repack_blocks<Q4_1>, &repack_blocks<IQ4_NL>,
                                   &repack_blocks<Q5_0>, &repack_blocks<Q5_1>, &repack_blocks<Q8_0>,
                                   &repack_blocks<Q2_K>, &repack_blocks<Q3_K>, &repack_blocks<Q4_K>,
                                   &repack_blocks<Q5_K>, &repack_blocks<Q6_K>, &repack_blocks<IQ4_XS>,
                                   &repack_blocks<MXFP4>};
  return fns[i];
}

// GGUF bytes of an (n, k) matrix in the layout's type -> (codes, records), as
// gguf_layouts.repack builds them. Only reads `raw` (it may be a file's read-only map).
std::tuple<at::Tensor, at::Tensor> gguf_repack(const at::Tensor& raw, at::IntArrayRef layout, int64_t n, int64_t k) {
  const Layout l = read_layout(layout);
  const int kind = pick<int>(l, [](int i) { return i; });
  const int64_t per = l.scheme == 0 ? 32 : 256, group = l.scheme == 0 ? 64 : 256;
  TORCH_CHECK(n > 0 && k > 0 && k % per == 0 && raw.scalar_type() == at::kByte && raw.is_contiguous() &&
                  raw.numel() == n * (k / per) * BLOCK_BYTES[kind],
              "gguf_repack: raw must be the contiguous uint8 bytes of an (n, k) matrix of the layout's type");
  const int64_t blocks = (n + R - 1) / R, groups = (k + group - 1) / group;
  const int64_t rb = l.scheme == 0 ? 4 * (1 + l.mins) : 2 + 2 * (l.mins > 0) + 256 / l.sub * (1 + (l.mins == 1));
  at::Tensor codes = at::empty({blocks, groups * group / CHUNK, R, 8 * (l.low + l.high)}, raw.options());
  at::Tensor records = at::empty({blocks, groups, R, rb}, raw.options());
  const RepackFn fn = repack_for(kind);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t *cp = codes.data_ptr<uint8_t>(), *rp = records.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) { fn(src, n, k, begin, end, cp, rp); });
  return {codes, records};
}

// --- bf16 / f16 weights ------------------------------------------------------------------

template <bool BF16>
inline __m512 widen_half(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// MB rows of x (fp32) times 4 weight rows (their pointers) -> out[m * R + r].
template <bool BF16, int MB>
inline void half_block(const float* x, int64_t K, const uint16_t* const* w, float* out) {
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int64_t r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    for (int64_t r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + PREFETCH / 4), _MM_HINT_T0);  // 2048 bytes
      const __m512 a = widen_half<BF16>(w[r] + k), b = widen_half<BF16>(w[r] + k + 16);
      for (int m = 0; m < MB; ++m) {
        acc[m][r] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + m * K + k), acc[m][r]);
        acc[m][r] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x + m * K + k + 16), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3], out + m * R);
}

template <bool BF16>
void run_half(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t n, float* y) {
  at::parallel_for(0, (n + R - 1) / R, 8, [&](int64_t begin, int64_t end) {
    float out[MB_MAX * R];
    for (int64_t b = begin; b < end; ++b) {
      const uint16_t* rows[R];
      for (int64_t r = 0; r < R; ++r) rows[r] = w + std::min(b * R + r, n - 1) * K;  // the last block repeats a row
      for (int64_t m = 0; m < M;) {
        const int64_t count = M - m >= MB_MAX ? MB_MAX : 1;
        if (count == MB_MAX)
          half_block<BF16, MB_MAX>(x + m * K, K, rows, out);
        else
          half_block<BF16, 1>(x + m * K, K, rows, out);
        for (int64_t i = 0; i < count; ++i)
          for (int64_t r = 0; r < R && b * R + r < n; ++r) y[(m + i) * n + b * R + r] = out[i * R + r];
        m += count;
      }
    }
  });
}

// x (M, K) float, w (N, K) bfloat16 or float16, K a multiple of 32 -> (M, N) fp32.
at::Tensor half_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && w.size(1) % 32 == 0 && w.is_contiguous() &&
                  (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf),
              "half_gemv: x (M, K) and a contiguous bf16/f16 w (N, K), K a multiple of 32");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), n = w.size(0);
  at::Tensor y = at::empty({M, n}, xf.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  if (w.scalar_type() == at::kBFloat16)
    run_half<true>(xf.data_ptr<float>(), M, K, wp, n, y.data_ptr<float>());
  else
    run_half<false>(xf.data_ptr<float>(), M, K, wp, n, y.data_ptr<float>());
  return y;
}

bool quant_kernels_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("f16c");
}

}  // namespace

#pragma GCC pop_options

TORCH_LIBRARY_FRAGMENT(pocketlm_kernels, m) {
  m.def("quant_kernels_supported() -> bool", &quant_kernels_supported);
  m.def("quant_gemv(Tensor x, Tensor codes, Tensor records, Tensor? table, int[] layout, int n) -> Tensor");
  m.def("quant_dequant(Tensor codes, Tensor records, Tensor? table, int[] layout, int row0, int rows, int k, bool bf16) -> Tensor");
  m.def("half_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("gguf_repack(Tensor raw, int[] layout, int n, int k) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(pocketlm_kernels, CPU, m) {
  m.impl("quant_gemv", &quant_gemv);
  m.impl("quant_dequant", &quant_dequant);
  m.impl("half_gemv", &half_gemv);
  m.impl("gguf_repack", &gguf_repack);
}
