// netshrink's native batch-1 decode step for Llama-style decoders with packed INT4/INT3/INT8 weights.
//
// Decoding one token reads every weight once, so it is bound by memory bandwidth, and at SmolLM2's sizes by the
// per-call cost of a framework too. This file runs a whole token (embedding row, every block, the head) in one
// call, on a pool of threads, each with its shard of every block (tensor parallelism: its heads' attention and a
// slice of the MLP, see Shard), that meet at a spin barrier twice per block to add their partial sums:
//   - activations are quantized to int8 per block of 64 columns (absmax / 127), as llama.cpp's Q8 does per 32;
//   - weights stay on their own grid w = (code - zero) * scale, codes unsigned, so one AVX-512 VNNI instruction
//     (vpdpbusd: u8 codes x s8 activations) does 64 multiply-adds, and the zero point is applied once per group:
//       y_r = sum_b a_b s_{r,g(b)} sum_{k in b} code_k q_k  +  sum_g m_{r,g} sum_{b in g} a_b sum_{k in b} q_k
//     with m = -scale * zero;
//   - weights are stored by tiles of 16 rows so that each VNNI lane is one row (see gemv_tiles), each thread's in
//     the order it reads them, and asked for 8 KiB ahead of the reads; during attention, which reads no weights,
//     a thread pulls its o_proj slice into L2;
//   - attention, RoPE, RMSNorm and SiLU run in float32, next to a float16 KV cache.
// The Python side (native/decoder.py, shards.py, layout.py, build.py) splits the blocks, builds the layouts,
// compiles this file and checks the model before handing it pointers.
#include <immintrin.h>

#include "pool.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using netshrink::exp512;
using netshrink::Pool;
using netshrink::tail_mask;

constexpr int kBlock = 64;  // activation block: one int8 scale per 64 columns (weight groups are whole blocks)

struct Matrix {
  const uint8_t* codes = nullptr;  // int4: rows x cols/2 bytes; int8: rows x cols bytes
  const float* scales = nullptr;   // rows x groups
  const uint8_t* zeros = nullptr;  // [tile][group][16] integer zero points
  const float* bias = nullptr;     // rows, or null
  int rows = 0, cols = 0, bits = 0, groups = 0, blocks_per_group = 1;
};

// An activation vector quantized per block: q (int8), a_b (scale), ax_b = a_b * sum(q in block).
struct QAct {
  std::vector<int8_t> q;
  std::vector<float> a, ax;
  void resize(int cols) {
    q.assign(cols + 64, 0);
    int nb = (cols + kBlock - 1) / kBlock;
    a.assign(nb, 0.f);
    ax.assign(nb, 0.f);
  }
};


// Quantize blocks [b0, b1) of x (cols values) into qa: q = clamp(round_half_even(x * 127 / absmax), +-127).
void quantize_blocks(const float* x, int cols, int b0, int b1, QAct& qa) {
  for (int b = b0; b < b1; ++b) {
    const int start = b * kBlock, n = std::min(kBlock, cols - start);
    __m512 mx = _mm512_setzero_ps();
    for (int k = 0; k < n; k += 16)
      mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(n - k), x + start + k)));
    const float amax = _mm512_reduce_max_ps(mx);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i sum = _mm512_setzero_si512();
    for (int k = 0; k < n; k += 16) {
      const __mmask16 mask = tail_mask(n - k);
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + start + k), vinv));
      v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
      _mm512_mask_cvtepi32_storeu_epi8(qa.q.data() + start + k, mask, v);
      sum = _mm512_add_epi32(sum, v);
    }
    qa.a[b] = amax / 127.f;
    qa.ax[b] = qa.a[b] * (float)_mm512_reduce_add_epi32(sum);
  }
}

// float32 <-> float16 for the KV cache; values are clamped to float16's range first (no infinities).
inline __m256i to_half(__m512 v) {
  v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(65504.f)), _mm512_set1_ps(-65504.f));
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m512 from_half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// The rows of an n-row matrix that thread t of `threads` computes: equal shares in multiples of 16.
std::pair<int, int> thread_rows(int n, int threads, int t) {
  const int per = ((n + threads - 1) / threads + 15) / 16 * 16;
  const int a = std::min(n, t * per), b = std::min(n, a + per);
  return {a, b};
}

// Weights are stored by tiles of 16 rows. A chunk of 64 bytes holds, for every row i of a tile, four bytes at
// 4i..4i+3: INT8 codes of 4 consecutive columns, or INT4 codes of 8 columns (k..k+3 in the low nibbles, k+4..k+7
// in the high ones). One vpdpbusd then multiplies 16 rows by 4 broadcast activations, lanes = rows, so no
// horizontal sums are needed. Tiles are computed NT = 4 at a time (the last 1-3 of a thread's rows together), and
// such a group is stored chunk by chunk, interleaved: chunk c of its tile j at c * NT * 64 + j * 64. Each thread
// then reads its rows as one sequential stream, which the hardware prefetcher follows; four separate tile streams
// of a few KiB each restarted it every few KiB (1.4-1.5x slower). Scales (float32) and zero points (uint8) are
// stored [tile][group][16].
// How far ahead of its reads a thread asks for its weights (into L2). The hardware prefetcher alone leaves one
// core well below the rate it can stream: +8% tokens/s on one thread, +4-8% on two, measured at 4-16 KiB ahead
// (8 KiB best); 512 B ahead was 13% slower. Past the end of a matrix it reads into the thread's next one.
constexpr int kPrefetchAhead = 8192;

template <int NT, int BITS>
inline void gemv_tiles(const Matrix& m, const QAct& x, const float* xg, int tile0, int r_end, float* y) {
  const int K = m.cols;
  const size_t tile_bytes = (size_t)16 * K * BITS / 8;
  const uint8_t* w[NT];
  __m512 f[NT];
  for (int t = 0; t < NT; ++t) w[t] = m.codes + tile0 * tile_bytes + t * 64, f[t] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int8_t* q = x.q.data();
  const int nblocks = (K + kBlock - 1) / kBlock;
  for (int b = 0; b < nblocks; ++b) {
    const int k0 = b * kBlock, k1 = std::min(K, k0 + kBlock);
    __m512i acc0[NT], acc1[NT];
    for (int t = 0; t < NT; ++t) acc0[t] = _mm512_setzero_si512(), acc1[t] = _mm512_setzero_si512();
    for (int k = k0; k < k1; k += 8) {
      int32_t lo_bytes, hi_bytes;
      std::memcpy(&lo_bytes, q + k, 4);
      std::memcpy(&hi_bytes, q + k + 4, 4);
      const __m512i xl = _mm512_set1_epi32(lo_bytes), xh = _mm512_set1_epi32(hi_bytes);
      const char* ahead = (const char*)(w[0] + (size_t)(k / (BITS == 4 ? 8 : 4)) * 64 * NT) + kPrefetchAhead;
      for (int t = 0; t < NT * (BITS == 4 ? 1 : 2); ++t) _mm_prefetch(ahead + 64 * t, _MM_HINT_T1);
      for (int t = 0; t < NT; ++t) {
        if (BITS == 4) {  // high nibbles stay in place: acc1 sums 16 x code x q, divided out once per block
          const __m512i v = _mm512_loadu_si512(w[t] + (size_t)(k / 8) * 64 * NT);
          acc0[t] = _mm512_dpbusd_epi32(acc0[t], _mm512_and_si512(v, low4), xl);
          acc1[t] = _mm512_dpbusd_epi32(acc1[t], _mm512_andnot_si512(low4, v), xh);
        } else {
          acc0[t] = _mm512_dpbusd_epi32(acc0[t], _mm512_loadu_si512(w[t] + (size_t)(k / 4) * 64 * NT), xl);
          acc1[t] = _mm512_dpbusd_epi32(acc1[t], _mm512_loadu_si512(w[t] + (size_t)(k / 4 + 1) * 64 * NT), xh);
        }
      }
    }
    const int g = b / m.blocks_per_group;
    const __m512 a = _mm512_set1_ps(x.a[b]);
    for (int t = 0; t < NT; ++t) {
      const __m512 s = _mm512_loadu_ps(m.scales + ((size_t)(tile0 + t) * m.groups + g) * 16);
      const __m512i hi = BITS == 4 ? _mm512_srai_epi32(acc1[t], 4) : acc1[t];   // exact: acc1 = 16 x sum
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc0[t], hi)), _mm512_mul_ps(s, a), f[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    const size_t base = (size_t)(tile0 + t) * m.groups * 16;
    for (int g = 0; g < m.groups; ++g) {  // the zero points: - scale * zero * sum_b a_b sum(q)
      const __m128i zero8 = _mm_loadu_si128((const __m128i*)(m.zeros + base + g * 16));
      const __m512 zero = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zero8));
      const __m512 scale = _mm512_loadu_ps(m.scales + base + g * 16);
      f[t] = _mm512_fnmadd_ps(_mm512_mul_ps(scale, zero), _mm512_set1_ps(xg[g]), f[t]);
    }
    const int r = (tile0 + t) * 16;
    const __mmask16 mask = tail_mask(r_end - r);
    if (m.bias) f[t] = _mm512_add_ps(f[t], _mm512_maskz_loadu_ps(mask, m.bias + r));
    _mm512_mask_storeu_ps(y + r, mask, f[t]);
  }
}

// y[r] = (W x)[r] (+ bias) for rows [r0, r1); r0 is a multiple of 16.
template <int BITS>
void gemv_bits(const Matrix& m, const QAct& x, int r0, int r1, float* y) {
  float xg[1024];  // per group: sum over its blocks of a_b * sum(q)
  for (int g = 0; g < m.groups; ++g) xg[g] = 0.f;
  const int nblocks = (m.cols + kBlock - 1) / kBlock;
  for (int b = 0; b < nblocks; ++b) xg[b / m.blocks_per_group] += x.ax[b];
  int tile = r0 / 16;
  const int tiles_end = (r1 + 15) / 16;
  for (; tile + 4 <= tiles_end; tile += 4) gemv_tiles<4, BITS>(m, x, xg, tile, r1, y);
  switch (tiles_end - tile) {  // the last 1-3 tiles form one interleaved group
    case 3: gemv_tiles<3, BITS>(m, x, xg, tile, r1, y); break;
    case 2: gemv_tiles<2, BITS>(m, x, xg, tile, r1, y); break;
    case 1: gemv_tiles<1, BITS>(m, x, xg, tile, r1, y); break;
    default: break;
  }
}

void gemv(const Matrix& m, const QAct& x, int r0, int r1, float* y) {
  if (r0 >= r1) return;
  if (m.bits == 8)
    gemv_bits<8>(m, x, r0, r1, y);
  else
    gemv_bits<4>(m, x, r0, r1, y);
}

void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / n + eps));
  for (int i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + i), inv);
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, w + i)));
  }
}

// x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[D/2:], x[:D/2]].
void rope(float* x, const float* cos, const float* sin, int d) {
  int h = d / 2;
  float tmp[1024];
  for (int i = 0; i < h; ++i) tmp[i] = -x[i + h];
  for (int i = h; i < d; ++i) tmp[i] = x[i - h];
  for (int i = 0; i < d; ++i) x[i] = x[i] * cos[i] + tmp[i] * sin[i];
}

// x[0..n) += sum over t of parts[t * stride + 0..n), the parts added in thread order (every thread gets the same x).
void add_parts(float* x, const float* parts, size_t stride, int threads, int n) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 mask = tail_mask(n - i);
    __m512 sum = _mm512_maskz_loadu_ps(mask, parts + i);
    for (int t = 1; t < threads; ++t) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, parts + t * stride + i));
    _mm512_mask_storeu_ps(x + i, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, x + i), sum));
  }
}

// Pulls a matrix's bytes into L2 a few cache lines at a time, from inside work that reads no weights (attention),
// so that memory is not idle while it runs.
struct Prefetcher {
  const char* next = nullptr;
  const char* end = nullptr;
  void start(const Matrix& m) {
    next = reinterpret_cast<const char*>(m.codes);
    end = next + (size_t)((m.rows + 15) / 16) * 16 * m.cols * m.bits / 8;
  }
  void ahead(int lines) {
    for (; lines > 0 && next < end; --lines, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

struct Norms {
  const float *norm1 = nullptr, *norm2 = nullptr, *q_norm = nullptr, *k_norm = nullptr;
};

// A thread's shard of every block, as in Megatron-style tensor parallelism: q heads [h0, h1) with the kv heads
// [j0, j1) they read (a kv head shared by two shards is computed by both), and intermediate rows [i0, i1) of the
// MLP. Its q/k/v and gate/up matrices hold its rows; its o and down matrices hold their columns for its heads
// and its intermediate rows, so their products are partial sums of the residual update. Threads meet twice per
// block, to add those partial sums, instead of before and after every matrix. A shard has its own KV cache and
// its own copy of the residual stream.
struct Shard {
  int h0 = 0, h1 = 0, j0 = 0, j1 = 0, i0 = 0, i1 = 0;
  struct Mats {
    Matrix qkv, o, gate_up, down;
  };
  std::vector<Mats> mats;
  std::vector<float> x, normed, qkv, attn, gu, hbuf, scores;
  std::vector<uint16_t> k_cache, v_cache;  // float16, as llama.cpp's default cache
  QAct act, act_attn, act_ffn;
};

struct Decoder {
  int layers, hidden, heads, kv_heads, head_dim, vocab, max_len;
  float eps, scaling;
  const float *embed, *cos, *sin, *final_norm;
  std::vector<Norms> norms;
  std::vector<Shard> shards;
  Matrix head;
  std::vector<float> logits;
  std::vector<float> parts_storage;  // per thread: the partial residual update (attention, then MLP)
  float* parts = nullptr;
  size_t part_stride = 0;
  std::vector<float> best_value;
  std::vector<int> best_index;
  static constexpr int kPhases = 10;
  std::vector<uint64_t> cycles;     // per thread and phase: time stamp counter ticks (see nsd_profile)
  Pool pool;

  void mark(int t, int phase, uint64_t& clock) {
    const uint64_t now = __rdtsc();
    cycles[t * kPhases + phase] += now - clock;
    clock = now;
  }

  Decoder(int L, int hid, int H, int KV, int D, int V, int T, int threads, float e, float sc)
      : layers(L), hidden(hid), heads(H), kv_heads(KV), head_dim(D), vocab(V), max_len(T), eps(e),
        scaling(sc), norms(L), shards(threads), pool(threads) {
    logits.assign(V, 0.f);
    part_stride = ((size_t)hid + 15) / 16 * 16;                       // each thread's part on its own cache lines
    parts_storage.assign(2 * threads * part_stride + 16, 0.f);  // attention's, then the MLP's
    parts = parts_storage.data() + ((64 - (uintptr_t)parts_storage.data() % 64) % 64) / sizeof(float);
    best_value.assign(threads, 0.f);
    best_index.assign(threads, 0);
    cycles.assign(threads * kPhases, 0);
  }

  // Size a shard's buffers once its ranges are known.
  void set_shard(int t, int h0, int h1, int j0, int j1, int i0, int i1) {
    Shard& s = shards[t];
    s.h0 = h0, s.h1 = h1, s.j0 = j0, s.j1 = j1, s.i0 = i0, s.i1 = i1;
    const int D = head_dim, nh = h1 - h0, nkv = j1 - j0, ni = i1 - i0;
    s.mats.assign(layers, {});
    s.x.assign(hidden, 0.f);
    s.normed.assign(hidden, 0.f);
    s.qkv.assign((nh + 2 * nkv) * D + 16, 0.f);
    s.attn.assign(nh * D + 16, 0.f);
    s.gu.assign(2 * ni + 16, 0.f);
    s.hbuf.assign(ni + 16, 0.f);
    s.scores.assign(max_len + 16, 0.f);
    s.k_cache.assign((size_t)layers * nkv * D * key_stride(), 0);
    s.v_cache.assign((size_t)layers * nkv * max_len * D, 0);
    s.act.resize(hidden);
    s.act_attn.resize(std::max(1, nh * D));
    s.act_ffn.resize(std::max(1, ni));
  }

  // Keys are stored [layer][kv head][D][key_stride]: padded past max_len so that reading 16 positions at a time
  // stays inside, and so that the D rows do not all fall into the same few L1 cache sets.
  size_t key_stride() const { return (size_t)max_len + 16; }

  static void quantize_all(const float* x, int n, QAct& qa) { quantize_blocks(x, n, 0, (n + kBlock - 1) / kBlock, qa); }

  // Normalize and rotate the shard's q heads and kv heads (k and v into its cache at pos), then attend.
  void attention(Shard& s, int l, int pos, Prefetcher& pf) {
    const int D = head_dim, group = heads / kv_heads, nh = s.h1 - s.h0, nkv = s.j1 - s.j0;
    const float* c = cos + (size_t)pos * D;
    const float* sn = sin + (size_t)pos * D;
    const Norms& nm = norms[l];
    for (int jj = 0; jj < nkv; ++jj) {
      float* k = s.qkv.data() + (nh + jj) * D;
      if (nm.k_norm) rms_norm(k, nm.k_norm, D, eps, k);
      rope(k, c, sn, D);
      const size_t head = (size_t)l * nkv + jj;
      uint16_t* kc = s.k_cache.data() + head * D * key_stride();
      uint16_t* vc = s.v_cache.data() + (head * max_len + pos) * D;
      const float* v = s.qkv.data() + (nh + nkv + jj) * D;
      for (int i = 0; i < D; i += 16) {
        alignas(64) uint16_t kh[16];
        _mm256_store_si256((__m256i*)kh, to_half(_mm512_loadu_ps(k + i)));
        for (int e = 0; e < 16; ++e) kc[(i + e) * key_stride() + pos] = kh[e];
        _mm256_storeu_si256((__m256i*)(vc + i), to_half(_mm512_loadu_ps(v + i)));
      }
    }
    for (int hh = 0; hh < nh; ++hh) {
      float* q = s.qkv.data() + hh * D;
      if (nm.q_norm) rms_norm(q, nm.q_norm, D, eps, q);
      rope(q, c, sn, D);
      const int jj = (s.h0 + hh) / group - s.j0;
      const uint16_t* kc = s.k_cache.data() + ((size_t)l * nkv + jj) * D * key_stride();
      const uint16_t* vc = s.v_cache.data() + (((size_t)l * nkv + jj) * max_len) * D;
      float* sc = s.scores.data();
      __m512 vmax = _mm512_set1_ps(-INFINITY);
      for (int p = 0; p <= pos; p += 16) {       // 16 positions at once: keys are stored transposed
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int i = 0; i < D; i += 2) {
          acc0 = _mm512_fmadd_ps(_mm512_set1_ps(q[i]), from_half(kc + i * key_stride() + p), acc0);
          acc1 = _mm512_fmadd_ps(_mm512_set1_ps(q[i + 1]), from_half(kc + (i + 1) * key_stride() + p), acc1);
        }
        pf.ahead(8);
        const __mmask16 mask = tail_mask(pos + 1 - p);
        const __m512 v = _mm512_mul_ps(_mm512_add_ps(acc0, acc1), _mm512_set1_ps(scaling));
        _mm512_mask_storeu_ps(sc + p, mask, v);
        vmax = _mm512_mask_max_ps(vmax, mask, vmax, v);
      }
      const float mx = _mm512_reduce_max_ps(vmax);
      __m512 vsum = _mm512_setzero_ps();
      const __m512 vmx = _mm512_set1_ps(mx);
      for (int p = 0; p <= pos; p += 16) {
        const __mmask16 mask = tail_mask(pos + 1 - p);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sc + p), vmx));
        _mm512_mask_storeu_ps(sc + p, mask, e);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(mask, e));
      }
      const float inv_sum = 1.f / _mm512_reduce_add_ps(vsum);
      float* out = s.attn.data() + hh * D;
      if (D == 64)
        weighted_sum<4>(sc, vc, pos + 1, D, inv_sum, out, pf);
      else if (D == 128)
        weighted_sum<8>(sc, vc, pos + 1, D, inv_sum, out, pf);
      else
        for (int i = 0; i < D; i += 16) weighted_sum<1>(sc, vc + i, pos + 1, D, inv_sum, out + i, pf);
    }
  }

  // out[0..16C) = scale * sum_p w[p] v[p * stride + 0..16C): C independent accumulators.
  template <int C>
  static void weighted_sum(const float* w, const uint16_t* v, int n, int stride, float scale, float* out,
                           Prefetcher& pf) {
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int p = 0; p < n; ++p) {
      pf.ahead(2);
      const __m512 wp = _mm512_set1_ps(w[p]);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(wp, from_half(v + (size_t)p * stride + 16 * c), acc[c]);
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(scale)));
  }

  // The product of a shard's column slice (o or down): its partial update of the residual, zeros if it has none.
  void partial_product(const Matrix& m, const QAct& act, float* part) {
    if (m.rows && m.cols)
      gemv(m, act, 0, m.rows, part);
    else
      std::fill(part, part + hidden, 0.f);
  }

  // One token at position pos on thread t; with want_logits the head runs and best_* hold each thread's argmax.
  void step(int token, int pos, bool want_logits, int t) {
    Shard& s = shards[t];
    const int T = pool.size(), nh = s.h1 - s.h0, ni = s.i1 - s.i0;
    float* part = parts + t * part_stride;
    std::memcpy(s.x.data(), embed + (size_t)token * hidden, hidden * sizeof(float));
    uint64_t clock = __rdtsc();
    for (int l = 0; l < layers; ++l) {
      const Shard::Mats& m = s.mats[l];
      rms_norm(s.x.data(), norms[l].norm1, hidden, eps, s.normed.data());
      quantize_all(s.normed.data(), hidden, s.act);
      mark(t, 0, clock);
      if (nh) gemv(m.qkv, s.act, 0, m.qkv.rows, s.qkv.data());
      mark(t, 1, clock);
      Prefetcher pf;
      pf.start(m.o);
      if (nh) attention(s, l, pos, pf);
      mark(t, 2, clock);
      if (nh) quantize_all(s.attn.data(), nh * head_dim, s.act_attn);
      partial_product(m.o, s.act_attn, part);
      mark(t, 3, clock);
      pool.barrier();
      mark(t, 4, clock);
      add_parts(s.x.data(), parts, part_stride, T, hidden);
      rms_norm(s.x.data(), norms[l].norm2, hidden, eps, s.normed.data());
      quantize_all(s.normed.data(), hidden, s.act);
      if (ni) gemv(m.gate_up, s.act, 0, m.gate_up.rows, s.gu.data());
      mark(t, 5, clock);
      for (int i = 0; i < ni; i += 16) {   // silu(gate) * up
        const __mmask16 mask = tail_mask(ni - i);
        const __m512 g = _mm512_maskz_loadu_ps(mask, s.gu.data() + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
        const __m512 up = _mm512_maskz_loadu_ps(mask, s.gu.data() + ni + i);
        _mm512_mask_storeu_ps(s.hbuf.data() + i, mask, _mm512_mul_ps(silu, up));
      }
      if (ni) quantize_all(s.hbuf.data(), ni, s.act_ffn);
      mark(t, 6, clock);
      partial_product(m.down, s.act_ffn, part + (size_t)T * part_stride);
      mark(t, 7, clock);
      pool.barrier();
      mark(t, 8, clock);
      add_parts(s.x.data(), parts + (size_t)T * part_stride, part_stride, T, hidden);
    }
    if (!want_logits) return;
    clock = __rdtsc();
    rms_norm(s.x.data(), final_norm, hidden, eps, s.normed.data());
    quantize_all(s.normed.data(), hidden, s.act);
    auto [r0, r1] = thread_rows(head.rows, T, t);
    gemv(head, s.act, r0, r1, logits.data());
    int best = r0;
    for (int r = r0; r < r1; ++r)
      if (logits[r] > logits[best]) best = r;
    best_index[t] = best;
    best_value[t] = r1 > r0 ? logits[best] : -INFINITY;
    mark(t, 9, clock);
  }
};

Matrix make_matrix(const uint8_t* codes, const float* scales, const uint8_t* zeros, const float* bias, int rows,
                   int cols, int bits, int groups, int blocks_per_group) {
  Matrix m;
  m.codes = codes, m.scales = scales, m.zeros = zeros, m.bias = bias;
  m.rows = rows, m.cols = cols, m.bits = bits, m.groups = groups, m.blocks_per_group = blocks_per_group;
  return m;
}

}  // namespace

extern "C" {

void* nsd_create(int layers, int hidden, int heads, int kv_heads, int head_dim, int vocab, int max_len,
                 int threads, float eps, float scaling, const float* embed, const float* cos, const float* sin,
                 const float* final_norm) {
  auto* d = new Decoder(layers, hidden, heads, kv_heads, head_dim, vocab, max_len, threads, eps, scaling);
  d->embed = embed, d->cos = cos, d->sin = sin, d->final_norm = final_norm;
  return d;
}

// Thread t's shard: q heads [h0, h1), kv heads [j0, j1), intermediate rows [i0, i1); call before its matrices.
void nsd_set_shard(void* handle, int t, int h0, int h1, int j0, int j1, int i0, int i1) {
  static_cast<Decoder*>(handle)->set_shard(t, h0, h1, j0, j1, i0, i1);
}

// which: 0 qkv, 1 o, 2 gate_up, 3 down of thread t's shard of a layer; 4 the head (thread and layer ignored)
void nsd_set_matrix(void* handle, int t, int layer, int which, const uint8_t* codes, const float* scales,
                    const uint8_t* zeros, const float* bias, int rows, int cols, int bits, int groups,
                    int blocks_per_group) {
  auto* d = static_cast<Decoder*>(handle);
  Matrix m = make_matrix(codes, scales, zeros, bias, rows, cols, bits, groups, blocks_per_group);
  if (which == 4) {
    d->head = m;
    return;
  }
  Shard::Mats& b = d->shards[t].mats[layer];
  (which == 0 ? b.qkv : which == 1 ? b.o : which == 2 ? b.gate_up : b.down) = m;
}

void nsd_set_norms(void* handle, int layer, const float* norm1, const float* norm2, const float* q_norm,
                   const float* k_norm) {
  Norms& b = static_cast<Decoder*>(handle)->norms[layer];
  b.norm1 = norm1, b.norm2 = norm2, b.q_norm = q_norm, b.k_norm = k_norm;
}

// Feed tokens ids[0..n) at positions start.. ; the last one's logits go to `logits` (if not null).
// Returns the argmax of the last token's logits.
int nsd_forward(void* handle, const int64_t* ids, int n, int start, float* logits) {
  auto* d = static_cast<Decoder*>(handle);
  for (int i = 0; i < n; ++i) {
    const bool last = i == n - 1;
    d->pool.run([&](int t) { d->step((int)ids[i], start + i, last, t); });
  }
  if (logits) std::memcpy(logits, d->logits.data(), d->vocab * sizeof(float));
  int best = d->best_index[0];
  float value = d->best_value[0];
  for (int t = 1; t < d->pool.size(); ++t)
    if (d->best_value[t] > value) value = d->best_value[t], best = d->best_index[t];
  return best;
}

// Greedy continuation: prompt ids[0..n) from position 0, then new_tokens ids into out.
void nsd_generate(void* handle, const int64_t* ids, int n, int new_tokens, int64_t* out) {
  int next = nsd_forward(handle, ids, n, 0, nullptr);
  for (int i = 0; i < new_tokens; ++i) {
    out[i] = next;
    if (i + 1 < new_tokens) {
      int64_t token = next;
      next = nsd_forward(handle, &token, 1, n + i, nullptr);
    }
  }
}


void nsd_destroy(void* handle) { delete static_cast<Decoder*>(handle); }

// Time stamp counter ticks per thread and phase since the last call (threads x 10, then reset): 0 norm and
// quantize, 1 q/k/v, 2 attention, 3 o_proj, 4 wait, 5 norm + gate/up, 6 SiLU, 7 down, 8 wait, 9 head.
void nsd_profile(void* handle, uint64_t* out) {
  auto* d = static_cast<Decoder*>(handle);
  std::memcpy(out, d->cycles.data(), d->cycles.size() * sizeof(uint64_t));
  std::fill(d->cycles.begin(), d->cycles.end(), 0);
}

// One matrix times one vector on the calling thread: for tests and single-layer timings.
// `threads`: the thread count the layout was grouped for; the shares run one after the other here.
void nsd_matvec(const uint8_t* codes, const float* scales, const uint8_t* zeros, const float* bias, int rows, int cols,
                int bits, int groups, int blocks_per_group, int threads, const float* x, float* y) {
  Matrix m = make_matrix(codes, scales, zeros, bias, rows, cols, bits, groups, blocks_per_group);
  QAct qa;
  qa.resize(cols);
  quantize_blocks(x, cols, 0, (cols + kBlock - 1) / kBlock, qa);
  for (int t = 0; t < threads; ++t) {
    auto [r0, r1] = thread_rows(rows, threads, t);
    gemv(m, qa, r0, r1, y);
  }
}

}  // extern "C"
