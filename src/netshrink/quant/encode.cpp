// netshrink's native forward pass for BERT-style encoders (post-LayerNorm, exact GELU) with int8 weights.
//
// It computes what netshrink's Int8Dynamic model computes, in one call on a team of threads:
//   - every Linear multiplies per-token int8 activation codes (scale = max|row| / 127, round half to even) by the
//     layer's symmetric per-channel int8 weight codes with int32 sums. One vpdpbusd does 64 multiply-adds; it wants
//     one unsigned operand, so weights are stored as code + 128 and 128 * sum(activation codes) is taken off again:
//       sum_k (w_k + 128) a_k - 128 sum_k a_k = sum_k w_k a_k   (exact in int32);
//   - the GEMM's micro-tile dequantizes and adds the bias as it stores (y = acc * s_a * s_w + b); the residual add,
//     LayerNorm, GELU and the next Linear's activation quantization then run on each chunk of rows while it is
//     still in cache, instead of as separate passes over the whole batch;
//   - attention runs per sequence and head, over the keys the padding mask keeps: scores and softmax in float32,
//     the value products in bfloat16 (vdpbf16ps, two keys per instruction).
// Each thread owns one contiguous range of tokens for the whole forward. Only attention reads other threads' rows
// (their keys and values), so threads meet at one barrier per layer; q/k/v alternate between two buffers by layer
// so that a thread running ahead never overwrites keys another thread is still reading.
// The threads are an OpenMP team from the libgomp torch itself loaded (same soname, so the same runtime and the
// same pool): torch's worker threads spin for a while after each of its parallel regions, and a second pool of
// our own waited up to a scheduler slice (~3 ms at batch 1) for the core such a spinning thread held.
// The Python side (quant/native_encoder.py) packs the weights, compiles this file and checks the model.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

#include "simd.h"

namespace {

using netshrink::exp512;
using netshrink::tail_mask;

constexpr int kNV = 3;         // zmm vectors of output columns in a micro-tile
constexpr int kNR = 16 * kNV;  // 48 output columns per packed weight panel
constexpr int kMR = 8;         // rows in a micro-tile: 8 x 3 = 24 int32 accumulators in registers
constexpr int kMC = 32;        // rows per chunk: a chunk's GEMM output is post-processed while in cache

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// An int8 Linear, packed by panels of 48 output columns: byte (p, k, c, i) at ((p * kpad + k) * 48 + c) * 4 + i
// holds code + 128 of output column 48p + c and input column 4k + i, so one 64-byte load gives 16 columns x 4
// inputs: the unsigned operand of vpdpbusd. Padding columns and rows hold code 0 (byte 128).
struct Linear {
  const uint8_t* packed = nullptr;
  const float* scale = nullptr;  // [npad], per output channel, 0 in the padding
  const float* bias = nullptr;   // [npad], 0 in the padding
  int n = 0, k = 0, npad = 0, kpad = 0;
};

// Per-token int8 activations of all rows: codes [rows][ld], scale and 128 * sum(codes) per row.
struct QRows {
  int8_t* q = nullptr;
  int ld = 0;
  float* scale = nullptr;
  int32_t* comp = nullptr;
};

// R rows x 48 columns of the int32 products a . (W + 128) over the whole reduction, into acc_out [R][48].
// (Kept apart from the epilogue: with both in one function GCC spills the accumulators inside the loop.)
template <int R>
__attribute__((noinline)) void dot_tile(const int8_t* a, int lda, const uint8_t* b, int kpad, int32_t* acc_out) {
  __m512i acc[R][kNV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kNV; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int k = 0; k < kpad; k += 4) {
    __m512i w[kNV];
#pragma GCC unroll 4
    for (int j = 0; j < kNV; ++j) w[j] = _mm512_loadu_si512(b + (size_t)k * kNR + j * 64);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      int32_t four;
      std::memcpy(&four, a + (size_t)i * lda + k, 4);
      const __m512i x = _mm512_set1_epi32(four);
#pragma GCC unroll 4
      for (int j = 0; j < kNV; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], w[j], x);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kNV; ++j) _mm512_storeu_si512(acc_out + i * kNR + j * 16, acc[i][j]);
}

// R rows x 48 columns of y = dequant(a . W) + bias, stored to c (row stride ldc).
template <int R>
inline void micro_tile(const int8_t* a, int lda, const uint8_t* b, int kpad, const float* sa, const int32_t* comp,
                       const float* sw, const float* bias, float* c, int ldc) {
  alignas(64) int32_t acc[R * kNR];
  dot_tile<R>(a, lda, b, kpad, acc);
  for (int i = 0; i < R; ++i) {
    const __m512i ci = _mm512_set1_epi32(comp[i]);
    const __m512 si = _mm512_set1_ps(sa[i]);
    for (int j = 0; j < kNV; ++j) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(acc + i * kNR + j * 16), ci));
      const __m512 s = _mm512_mul_ps(si, _mm512_loadu_ps(sw + j * 16));
      _mm512_storeu_ps(c + (size_t)i * ldc + j * 16, _mm512_fmadd_ps(v, s, _mm512_loadu_ps(bias + j * 16)));
    }
  }
}

// micro_tile for the 1-7 rows left at the end of a chunk, indexed by their count.
constexpr decltype(&micro_tile<1>) kTailTiles[kMR] = {nullptr,        micro_tile<1>, micro_tile<2>, micro_tile<3>,
                                                      micro_tile<4>, micro_tile<5>, micro_tile<6>, micro_tile<7>};

// c[m - m0][0..npad) = dequant(a[m] . W) + bias for rows [m0, m1) of one chunk (at most kMC rows: their codes stay
// in L1 while every weight panel passes by).
void gemm_chunk(const Linear& L, const QRows& a, int m0, int m1, float* c, int ldc) {
  const size_t panel = (size_t)L.kpad * kNR;
  for (int p = 0; p < L.npad / kNR; ++p) {
    const uint8_t* b = L.packed + p * panel;
    const float *sw = L.scale + p * kNR, *bias = L.bias + p * kNR;
    int m = m0;
    for (; m + kMR <= m1; m += kMR)
      micro_tile<kMR>(a.q + (size_t)m * a.ld, a.ld, b, L.kpad, a.scale + m, a.comp + m, sw, bias,
                      c + (size_t)(m - m0) * ldc + p * kNR, ldc);
    if (m < m1)  // the last 1-7 rows
      kTailTiles[m1 - m](a.q + (size_t)m * a.ld, a.ld, b, L.kpad, a.scale + m, a.comp + m, sw, bias,
                         c + (size_t)(m - m0) * ldc + p * kNR, ldc);
  }
}

// The same for any number of rows, chunk by chunk.
void gemm_rows(const Linear& L, const QRows& a, int m0, int m1, float* c, int ldc) {
  for (int c0 = m0; c0 < m1; c0 += kMC) gemm_chunk(L, a, c0, std::min(m1, c0 + kMC), c + (size_t)(c0 - m0) * ldc, ldc);
}

// Row m of `a` from x[0..n): codes clamp(round_half_even(x * 127 / max|x|), +-127), zero up to a.ld.
void quantize_row(const float* x, int n, const QRows& a, int m) {
  __m512 mx = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - i), x + i)));
  const float amax = _mm512_reduce_max_ps(mx);
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  int8_t* q = a.q + (size_t)m * a.ld;
  __m512i sum = _mm512_setzero_si512();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), inv));
    v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    _mm512_mask_cvtepi32_storeu_epi8(q + i, mask, v);
    sum = _mm512_add_epi32(sum, v);
  }
  for (int i = n; i < a.ld; ++i) q[i] = 0;
  a.scale[m] = amax / 127.f;
  a.comp[m] = 128 * _mm512_reduce_add_epi32(sum);
}

// x = LayerNorm(y + x) * w + b over n values, in place in x.
void add_layer_norm(const float* y, float* x, int n, const float* w, const float* b, float eps) {
  __m512 s = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, y + i), _mm512_maskz_loadu_ps(mask, x + i));
    _mm512_mask_storeu_ps(x + i, mask, v);
    s = _mm512_add_ps(s, v);
  }
  const float mean = _mm512_reduce_add_ps(s) / n;
  const __m512 vm = _mm512_set1_ps(mean);
  __m512 ss = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 d = _mm512_maskz_sub_ps(mask, _mm512_maskz_loadu_ps(mask, x + i), vm);
    ss = _mm512_fmadd_ps(d, d, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / n + eps));
  for (int i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + i), vm), inv);
    _mm512_mask_storeu_ps(x + i, mask,
                          _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(mask, w + i), _mm512_maskz_loadu_ps(mask, b + i)));
  }
}

// erf(x) by Abramowitz and Stegun 7.1.28: 1 - (1 + a1 x + ... + a6 x^6)^-16 for x >= 0 (absolute error below
// 3e-7), odd in x. No exponential: a polynomial, four squarings and one reciprocal.
inline __m512 erf512(__m512 x) {
  const __m512 ax = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(6.f)), one = _mm512_set1_ps(1.f);
  __m512 p = _mm512_set1_ps(0.0000430638f);
  p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0002765672f));
  p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0001520143f));
  p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0092705272f));
  p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0422820123f));
  p = _mm512_fmadd_ps(p, ax, _mm512_set1_ps(0.0705230784f));
  p = _mm512_fmadd_ps(p, ax, one);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);                 // (...)^16, at most ~1e12 for |x| <= 6
  __m512 r = _mm512_rcp14_ps(p);           // 1 / p to 2^-14, then one Newton step
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(p, r, _mm512_set1_ps(2.f)));
  const __m512 y = _mm512_sub_ps(one, r);
  return _mm512_mask_sub_ps(y, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps(), y);
}

// x = gelu(x) = x / 2 * (1 + erf(x / sqrt 2)), in place over n values.
void gelu_row(float* x, int n) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
    const __m512 e = erf512(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
    _mm512_mask_storeu_ps(x + i, mask, _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)),
                                                     _mm512_add_ps(e, _mm512_set1_ps(1.f))));
  }
}

struct Layer {
  Linear qkv, o, up, down;
  int heads = 0, inner = 0, inter = 0;  // inner = heads x head dimension (the width of q, k, v and ctx)
  const float *ln1_w = nullptr, *ln1_b = nullptr, *ln2_w = nullptr, *ln2_b = nullptr;
};

// Per-thread scratch for attention of one sequence and head.
struct Scratch {
  std::vector<float> kt, scores;
  std::vector<uint16_t> v, probs;  // bfloat16
  std::vector<int> keys;
};

// r[c] becomes column c of the 16 x 16 matrix whose rows were r[0..16).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + k], 128-bit lane L: rows 4i..4i+3 of column 4L + k
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  __m512 out[16];
  for (int k = 0; k < 4; ++k) {
    const __m512 x0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), x1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    const __m512 x2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88), x3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    out[k] = _mm512_shuffle_f32x4(x0, x2, 0x88);
    out[8 + k] = _mm512_shuffle_f32x4(x0, x2, 0xDD);
    out[4 + k] = _mm512_shuffle_f32x4(x1, x3, 0x88);
    out[12 + k] = _mm512_shuffle_f32x4(x1, x3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = out[i];
}

// scores[i][j..j + 16 KB) = q_i . k_j for Q queries and KB blocks of 16 keys.
template <int Q, int HV, int KB>
inline void score_block(const float (*qs)[HV * 16], const float* kt, int nkp, int j, float* scores) {
  __m512 s[Q][KB];
  for (int i = 0; i < Q; ++i)
    for (int b = 0; b < KB; ++b) s[i][b] = _mm512_setzero_ps();
  for (int d = 0; d < HV * 16; ++d) {
    __m512 k[KB];
    for (int b = 0; b < KB; ++b) k[b] = _mm512_loadu_ps(kt + (size_t)d * nkp + j + 16 * b);
    for (int i = 0; i < Q; ++i) {
      const __m512 qd = _mm512_set1_ps(qs[i][d]);
      for (int b = 0; b < KB; ++b) s[i][b] = _mm512_fmadd_ps(qd, k[b], s[i][b]);
    }
  }
  for (int i = 0; i < Q; ++i)
    for (int b = 0; b < KB; ++b) _mm512_storeu_ps(scores + (size_t)i * nkp + j + 16 * b, s[i][b]);
}

// Q queries (rows row0..row0+Q of qkv) attend to one head: ctx = softmax(q k^T * scaling) v over nk keys.
// kt: keys transposed [hd][nkp] (zero past nk); v: bfloat16 values in pairs of keys [nk / 2][hd][2] (zero past
// nk); HV = hd / 16 (the Python side admits
// head dimensions of 16, 32, 48 and 64 only).
template <int Q, int HV>
void attend(const float* qkv, int ldq, int row0, int q_off, float scaling, const float* kt, const uint16_t* v, int nk,
            int nkp, float* scores, uint16_t* probs, float* ctx, int ldc, int c_off) {
  constexpr int hd = HV * 16;
  float qs[Q][hd];
  for (int i = 0; i < Q; ++i)
    for (int d = 0; d < hd; ++d) qs[i][d] = qkv[(size_t)(row0 + i) * ldq + q_off + d] * scaling;
  // scores, 64 keys x Q queries at a time (4Q independent FMA chains), then the last 16-48 keys
  int j = 0;
  for (; j + 64 <= nkp; j += 64) score_block<Q, HV, 4>(qs, kt, nkp, j, scores);
  for (; j < nkp; j += 16) score_block<Q, HV, 1>(qs, kt, nkp, j, scores);
  float inv_sum[Q];
  for (int i = 0; i < Q; ++i) {  // softmax numerators in place; keys past nk get 0
    float* s = scores + (size_t)i * nkp;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int k = 0; k < nk; k += 16) mx = _mm512_mask_max_ps(mx, tail_mask(nk - k), mx, _mm512_loadu_ps(s + k));
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int k = 0; k < nkp; k += 16) {
      const __m512 e = _mm512_maskz_mov_ps(tail_mask(nk - k), exp512(_mm512_sub_ps(_mm512_loadu_ps(s + k), vmax)));
      _mm512_storeu_ps(s + k, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv_sum[i] = 1.f / _mm512_reduce_add_ps(sum);
  }
  for (int i = 0; i < Q; ++i)  // probabilities to bfloat16, 32 at a time (nkp is a multiple of 16, zero past nk)
    for (int k = 0; k < nkp; k += 32) {
      const __m512 lo = _mm512_loadu_ps(scores + (size_t)i * nkp + k);
      const __m512 hi = k + 16 < nkp ? _mm512_loadu_ps(scores + (size_t)i * nkp + k + 16) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      if (k + 16 < nkp)
        _mm512_storeu_si512(probs + (size_t)i * nkp + k, both);
      else
        _mm256_storeu_si256((__m256i*)(probs + (size_t)i * nkp + k), _mm512_castsi512_si256(both));
    }
  __m512 acc[Q][HV];
  for (int i = 0; i < Q; ++i)
    for (int h = 0; h < HV; ++h) acc[i][h] = _mm512_setzero_ps();
  for (int k = 0; k < nk; k += 2) {  // two keys per vdpbf16ps: lane d += p_k v_k[d] + p_k+1 v_k+1[d]
    __m512bh vk[HV];
    for (int h = 0; h < HV; ++h) vk[h] = (__m512bh)_mm512_loadu_si512(v + ((size_t)(k / 2) * hd + h * 16) * 2);
    for (int i = 0; i < Q; ++i) {
      int32_t pair;
      std::memcpy(&pair, probs + (size_t)i * nkp + k, 4);
      const __m512bh p = (__m512bh)_mm512_set1_epi32(pair);
      for (int h = 0; h < HV; ++h) acc[i][h] = _mm512_dpbf16_ps(acc[i][h], p, vk[h]);
    }
  }
  for (int i = 0; i < Q; ++i)
    for (int h = 0; h < HV; ++h)
      _mm512_storeu_ps(ctx + (size_t)(row0 + i) * ldc + c_off + h * 16,
                       _mm512_mul_ps(acc[i][h], _mm512_set1_ps(inv_sum[i])));
}

template <int HV>
void attend_rows(const float* qkv, int ldq, int row0, int rows, int q_off, float scaling, const float* kt,
                 const uint16_t* v, int nk, int nkp, float* scores, uint16_t* probs, float* ctx, int ldc, int c_off) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) attend<4, HV>(qkv, ldq, row0 + r, q_off, scaling, kt, v, nk, nkp, scores, probs, ctx, ldc, c_off);
  switch (rows - r) {
    case 3: attend<3, HV>(qkv, ldq, row0 + r, q_off, scaling, kt, v, nk, nkp, scores, probs, ctx, ldc, c_off); break;
    case 2: attend<2, HV>(qkv, ldq, row0 + r, q_off, scaling, kt, v, nk, nkp, scores, probs, ctx, ldc, c_off); break;
    case 1: attend<1, HV>(qkv, ldq, row0 + r, q_off, scaling, kt, v, nk, nkp, scores, probs, ctx, ldc, c_off); break;
    default: break;
  }
}

// attend_rows for head dimensions 16, 32, 48 and 64, indexed by head_dim / 16 - 1.
constexpr decltype(&attend_rows<1>) kAttendRows[4] = {attend_rows<1>, attend_rows<2>, attend_rows<3>, attend_rows<4>};

struct Encoder {
  int layers, hidden, head_dim;         // layers may differ in head count and intermediate size (pruned models)
  float eps, scaling;
  std::vector<Layer> blocks;
  int threads;
  // per forward (grown as needed)
  int batch = 0, seq = 0;
  float* x = nullptr;                  // residual stream [batch * seq][hidden], in and out
  const uint8_t* valid = nullptr;      // [batch * seq]: 1 for a key the padding mask keeps
  std::vector<int8_t> codes_h, codes_i;
  std::vector<float> act_scale, qkv[2], ctx;
  std::vector<int32_t> act_comp;
  std::vector<std::vector<float>> tmp;  // per thread: one chunk of GEMM output
  std::vector<Scratch> scratch;
  static constexpr int kPhases = 6;     // q/k/v GEMM, barrier wait, attention, o + LN, up + GELU, down + LN
  std::vector<uint64_t> cycles;         // [thread][phase] time stamp counter ticks since the last nse_profile

  void mark(int t, int phase, uint64_t& clock) {
    const uint64_t now = __rdtsc();
    cycles[(size_t)t * kPhases + phase] += now - clock;
    clock = now;
  }

  Encoder(int layers, int hidden, int head_dim, float eps, int threads)
      : layers(layers), hidden(hidden), head_dim(head_dim), eps(eps), scaling(1.f / std::sqrt((float)head_dim)),
        blocks(layers), threads(threads), tmp(threads),
        scratch(threads), cycles((size_t)threads * kPhases, 0) {}

  int widest(int Layer::*field) const {
    int w = 0;
    for (const Layer& l : blocks) w = std::max(w, l.*field);
    return w;
  }
  int ld_h() const { return round_up(std::max(hidden, widest(&Layer::inner)), 4); }  // codes of x and of ctx
  int ld_i() const { return round_up(widest(&Layer::inter), 4); }
  QRows rows_h() { return {codes_h.data(), ld_h(), act_scale.data(), act_comp.data()}; }
  QRows rows_i() { return {codes_i.data(), ld_i(), act_scale.data(), act_comp.data()}; }

  void reserve(int b, int s) {
    batch = b, seq = s;
    const size_t m = (size_t)b * s;
    if (act_scale.size() >= m) return;
    codes_h.assign(m * ld_h(), 0);
    codes_i.assign(m * ld_i(), 0);
    act_scale.assign(m, 0.f);
    act_comp.assign(m, 0);
    int ldq = 0;
    for (const Layer& l : blocks) ldq = std::max(ldq, l.qkv.npad);
    qkv[0].assign(m * ldq, 0.f);
    qkv[1].assign(m * ldq, 0.f);
    ctx.assign(m * widest(&Layer::inner), 0.f);
    int chunk_cols = 0;
    for (const Layer& l : blocks) chunk_cols = std::max({chunk_cols, l.o.npad, l.up.npad, l.down.npad});
    for (auto& t : tmp) t.assign((size_t)kMC * chunk_cols, 0.f);
  }

  std::pair<int, int> my_rows(int t, int team) const {
    const int m = batch * seq, per = round_up((m + team - 1) / team, kMR);
    const int a = std::min(m, t * per);
    return {a, std::min(m, a + per)};
  }

  // Attention of sequence b for its query rows [q0, q1), every head, over the keys its padding mask keeps; then
  // those rows of ctx quantized for the attention output GEMM.
  void attention(const Layer& L, const float* q, int b, int q0, int q1, int t) {
    Scratch& s = scratch[t];
    const int ldq = L.qkv.npad, hd = head_dim, inner = L.inner, ldc = widest(&Layer::inner);
    s.keys.clear();
    for (int j = 0; j < seq; ++j)
      if (valid[(size_t)b * seq + j]) s.keys.push_back(j);
    if (s.keys.empty())  // no key kept: every key (a fully masked row has no meaningful answer)
      for (int j = 0; j < seq; ++j) s.keys.push_back(j);
    const int nk = (int)s.keys.size(), nkp = round_up(nk, 16);
    const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i pair_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    s.kt.resize((size_t)hd * nkp);
    s.v.resize((size_t)(nk + 1) / 2 * hd * 2);
    s.scores.resize((size_t)4 * nkp);
    s.probs.resize((size_t)4 * nkp);
    for (int h = 0; h < L.heads; ++h) {
      for (int j0 = 0; j0 < nk; j0 += 16) {  // keys transposed by 16 x 16 blocks in registers
        for (int d0 = 0; d0 < hd; d0 += 16) {
          __m512 r[16];
          for (int j = 0; j < 16; ++j)
            r[j] = j0 + j < nk ? _mm512_loadu_ps(q + ((size_t)b * seq + s.keys[j0 + j]) * ldq + inner + h * hd + d0)
                               : _mm512_setzero_ps();
          transpose16(r);
          for (int d = 0; d < 16; ++d) _mm512_storeu_ps(s.kt.data() + (size_t)(d0 + d) * nkp + j0, r[d]);
        }
      }
      for (int j = 0; j < nk; j += 2) {  // values as bfloat16 pairs of consecutive keys: [j / 2][d][2]
        const float* v0 = q + ((size_t)b * seq + s.keys[j]) * ldq + 2 * inner + h * hd;
        const float* v1 = j + 1 < nk ? q + ((size_t)b * seq + s.keys[j + 1]) * ldq + 2 * inner + h * hd : nullptr;
        for (int d0 = 0; d0 < hd; d0 += 16) {
          const __m512 a = _mm512_loadu_ps(v0 + d0), c = v1 ? _mm512_loadu_ps(v1 + d0) : _mm512_setzero_ps();
          const __m512 lo = _mm512_permutex2var_ps(a, pair_lo, c), hi = _mm512_permutex2var_ps(a, pair_hi, c);
          _mm512_storeu_si512(s.v.data() + ((size_t)(j / 2) * hd + d0) * 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
      }
      const int off = h * hd;
      kAttendRows[hd / 16 - 1](q, ldq, q0, q1 - q0, off, scaling, s.kt.data(), s.v.data(), nk, nkp, s.scores.data(),
                               s.probs.data(), ctx.data(), ldc, off);
    }
    const QRows ah = rows_h();
    for (int m = q0; m < q1; ++m) quantize_row(ctx.data() + (size_t)m * ldc, inner, ah, m);
  }

  void run(int t, int team) {
    const auto [r0, r1] = my_rows(t, team);
    float* chunk = tmp[t].data();
    const QRows ah = rows_h(), ai = rows_i();
    uint64_t clock = __rdtsc();
    for (int m = r0; m < r1; ++m) quantize_row(x + (size_t)m * hidden, hidden, ah, m);
    for (int l = 0; l < layers; ++l) {
      const Layer& L = blocks[l];
      float* q = qkv[l % 2].data();
      const int ldq = L.qkv.npad;
      // A sequence whose rows all belong to this thread is computed q/k/v then attention at once, while its keys
      // and values are in this core's cache; a sequence shared with another thread waits for the barrier.
      const int b0 = r0 / seq, b1 = r1 > r0 ? (r1 - 1) / seq + 1 : b0;
      auto shared = [&](int b) { return b * seq < r0 || (b + 1) * seq > r1; };
      for (int b = b0; b < b1; ++b)
        if (shared(b)) {
          const int q0 = std::max(r0, b * seq), q1 = std::min(r1, (b + 1) * seq);
          gemm_rows(L.qkv, ah, q0, q1, q + (size_t)q0 * ldq, ldq);
        }
      for (int b = b0; b < b1; ++b)
        if (!shared(b)) {
          gemm_rows(L.qkv, ah, b * seq, (b + 1) * seq, q + (size_t)b * seq * ldq, ldq);
          mark(t, 0, clock);
          attention(L, q, b, b * seq, (b + 1) * seq, t);
          mark(t, 2, clock);
        }
      mark(t, 0, clock);
#pragma omp barrier
      mark(t, 1, clock);
      for (int b = b0; b < b1; ++b)
        if (shared(b)) attention(L, q, b, std::max(r0, b * seq), std::min(r1, (b + 1) * seq), t);
      mark(t, 2, clock);
      for (int c0 = r0; c0 < r1; c0 += kMC) {  // attention output projection, residual, LayerNorm
        const int c1 = std::min(r1, c0 + kMC);
        gemm_rows(L.o, ah, c0, c1, chunk, L.o.npad);
        for (int m = c0; m < c1; ++m) {
          float* xm = x + (size_t)m * hidden;
          add_layer_norm(chunk + (size_t)(m - c0) * L.o.npad, xm, hidden, L.ln1_w, L.ln1_b, eps);
          quantize_row(xm, hidden, ah, m);
        }
      }
      mark(t, 3, clock);
      for (int c0 = r0; c0 < r1; c0 += kMC) {  // intermediate: GELU, quantized for the output projection
        const int c1 = std::min(r1, c0 + kMC);
        gemm_rows(L.up, ah, c0, c1, chunk, L.up.npad);
        for (int m = c0; m < c1; ++m) {
          float* y = chunk + (size_t)(m - c0) * L.up.npad;
          gelu_row(y, L.inter);
          quantize_row(y, L.inter, ai, m);
        }
      }
      mark(t, 4, clock);
      for (int c0 = r0; c0 < r1; c0 += kMC) {  // output projection, residual, LayerNorm
        const int c1 = std::min(r1, c0 + kMC);
        gemm_rows(L.down, ai, c0, c1, chunk, L.down.npad);
        for (int m = c0; m < c1; ++m) {
          float* xm = x + (size_t)m * hidden;
          add_layer_norm(chunk + (size_t)(m - c0) * L.down.npad, xm, hidden, L.ln2_w, L.ln2_b, eps);
          if (l + 1 < layers) quantize_row(xm, hidden, ah, m);
        }
      }
      mark(t, 5, clock);
    }
  }
};

Linear make_linear(const uint8_t* packed, const float* scale, const float* bias, int n, int k) {
  Linear L;
  L.packed = packed, L.scale = scale, L.bias = bias, L.n = n, L.k = k;
  L.npad = round_up(n, kNR), L.kpad = round_up(k, 4);
  return L;
}

}  // namespace

extern "C" {

int nse_panel_columns() { return kNR; }

void* nse_create(int layers, int hidden, int head_dim, float eps, int threads) {
  return new Encoder(layers, hidden, head_dim, eps, threads);
}

// which: 0 query/key/value (concatenated), 1 attention output, 2 intermediate, 3 output.
void nse_set_linear(void* handle, int layer, int which, const uint8_t* packed, const float* scale, const float* bias,
                    int n, int k) {
  auto* e = static_cast<Encoder*>(handle);
  Layer& b = e->blocks[layer];
  (which == 0 ? b.qkv : which == 1 ? b.o : which == 2 ? b.up : b.down) = make_linear(packed, scale, bias, n, k);
  if (which == 0) b.inner = n / 3, b.heads = n / 3 / e->head_dim;
  if (which == 2) b.inter = n;
}

void nse_set_norms(void* handle, int layer, const float* ln1_w, const float* ln1_b, const float* ln2_w,
                   const float* ln2_b) {
  Layer& b = static_cast<Encoder*>(handle)->blocks[layer];
  b.ln1_w = ln1_w, b.ln1_b = ln1_b, b.ln2_w = ln2_w, b.ln2_b = ln2_b;
}

// hidden [batch * seq][hidden]: the embeddings in, the last hidden state out (in place).
// valid [batch * seq]: 1 where the padding mask keeps the token as a key.
void nse_forward(void* handle, float* hidden, const uint8_t* valid, int batch, int seq) {
  auto* e = static_cast<Encoder*>(handle);
  e->reserve(batch, seq);
  e->x = hidden, e->valid = valid;
#pragma omp parallel num_threads(e->threads)
  e->run(omp_get_thread_num(), omp_get_num_threads());
}

// Time stamp counter ticks per thread and phase since the last call (threads x 6, then reset): 0 q/k/v GEMM,
// 1 barrier wait, 2 attention, 3 attention output + LayerNorm, 4 intermediate + GELU, 5 output + LayerNorm.
void nse_profile(void* handle, uint64_t* out) {
  auto* e = static_cast<Encoder*>(handle);
  std::memcpy(out, e->cycles.data(), e->cycles.size() * sizeof(uint64_t));
  std::fill(e->cycles.begin(), e->cycles.end(), 0);
}

void nse_destroy(void* handle) { delete static_cast<Encoder*>(handle); }

// One quantized Linear on the calling thread, for tests: y [m][n] = dequant(quant(x) . W) + bias.
void nse_linear(const uint8_t* packed, const float* scale, const float* bias, int n, int k, const float* x, int m,
                float* y) {
  const Linear L = make_linear(packed, scale, bias, n, k);
  std::vector<int8_t> codes((size_t)m * L.kpad);
  std::vector<float> sa(m), out((size_t)m * L.npad);
  std::vector<int32_t> comp(m);
  const QRows a{codes.data(), L.kpad, sa.data(), comp.data()};
  for (int r = 0; r < m; ++r) quantize_row(x + (size_t)r * k, k, a, r);
  gemm_rows(L, a, 0, m, out.data(), L.npad);
  for (int r = 0; r < m; ++r) std::memcpy(y + (size_t)r * n, out.data() + (size_t)r * L.npad, n * sizeof(float));
}

// gelu over n values in place, for tests.
void nse_gelu(float* x, int n) { gelu_row(x, n); }

}  // extern "C"
