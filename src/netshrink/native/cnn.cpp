// netshrink's native forward for small float32 CNNs: a chain of Conv2d (stride 1, square kernel, zero padding)
// + optional ReLU + optional 2x2 max pooling, then Linear (+ ReLU) layers, as structured pruning leaves them.
//
// At batch 1 a pruned CNN is small enough that a framework's fixed cost per operator (dispatch, a thread pool
// hand-off per layer) outweighs its arithmetic, so cutting FLOPs stops cutting time. Here a whole forward is one
// call: activations are NHWC with the zero padding built into each layer's input buffer (64-byte aligned, so two
// threads never share a cache line). A pooled convolution keeps both conv rows of a pooled row and 2P conv
// columns x 1-4 vectors of 16 output channels in registers and pools there; an unpooled one keeps 7 positions x
// up to 4 vectors and writes rows through a scratch buffer. With one sample, the threads of an OpenMP team (torch's
// libgomp, as in quant/encode.cpp) split each layer's (pooled rows x channel vectors) evenly, and meet at as few
// barriers as the data flow allows (forward_split); with several samples each thread takes whole samples and never
// waits. The Python side (native/cnn.py) reads the model, lays out the weights and checks shapes.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#include "simd.h"

namespace {

using netshrink::tail_mask;

constexpr int kXB = 7;  // output positions per register block
constexpr long kTailMacs = 1 << 16;  // Linears after the first this small run on one thread (batch-1 split mode)

inline int round16(int x) { return (x + 15) / 16 * 16; }

// Cache-line aligned storage: threads write neighbouring parts of shared activations, and a line split between
// two of them would bounce between the cores (false sharing) at every layer.
template <class T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new((n * sizeof(T) + 63) / 64 * 64, std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const LineAligned&) const { return true; }
  bool operator!=(const LineAligned&) const { return false; }
};
using Floats = std::vector<float, LineAligned<float>>;

struct Layer {
  int kind = 0;  // 0 conv, 1 linear
  // conv: input h x w x cin (padded by pad on each side in its buffer), output h_out x w_out x cout
  int cin = 0, cout = 0, k = 0, pad = 0, h = 0, w = 0, h_out = 0, w_out = 0, pool = 0, relu = 0;
  const float* weight = nullptr;  // conv: [k][k][cin][round16(cout)]; linear: [in][round16(out)]
  const float* bias = nullptr;    // [round16(out)]
  int in = 0, out = 0;            // linear
  // the layer's output size, and where it goes: the next conv's padded buffer, or a flat vector
  int ph() const { return pool ? h_out / 2 : h_out; }
  int pw() const { return pool ? w_out / 2 : w_out; }
};

struct Buffers {
  std::vector<Floats> act;  // act[i]: layer i's input (padded NHWC for a conv, flat for a linear)
  Floats rows;              // scratch: one unpooled conv output row
  Floats partial;           // this thread's share of the first Linear's sums (batch-1 split mode)
};

// One register block: X output positions starting at column x0 of conv output row y, CV vectors of output channels
// from co0, over the whole kernel window; bias and ReLU applied, stored to out[x][co] (row of w_out x coutp).
// C1: a single input channel (a first layer on grey images): the k*k taps run as one flat loop with the positions
// at constant offsets, since a per-channel inner loop of one trip would cost more than its FMAs.
template <int X, int CV, bool C1>
inline void conv_block(const Layer& L, const float* in, int y, int x0, int co0, float* out) {
  const int coutp = round16(L.cout), wp = L.w + 2 * L.pad;
  __m512 acc[X][CV];
  for (int v = 0; v < CV; ++v) {
    const __m512 b = _mm512_loadu_ps(L.bias + co0 + 16 * v);
    for (int j = 0; j < X; ++j) acc[j][v] = b;
  }
  if constexpr (C1) {
    const float* base = in + (size_t)y * wp + x0;
    const float* wt = L.weight + co0;
    for (int ky = 0; ky < L.k; ++ky, base += wp)
      for (int kx = 0; kx < L.k; ++kx, wt += coutp) {
        __m512 wv[CV];
        for (int v = 0; v < CV; ++v) wv[v] = _mm512_loadu_ps(wt + 16 * v);
        for (int j = 0; j < X; ++j) {
          const __m512 a = _mm512_set1_ps(base[kx + j]);
          for (int v = 0; v < CV; ++v) acc[j][v] = _mm512_fmadd_ps(a, wv[v], acc[j][v]);
        }
      }
  } else {
    for (int ky = 0; ky < L.k; ++ky)
      for (int kx = 0; kx < L.k; ++kx) {
        const float* src = in + ((size_t)(y + ky) * wp + x0 + kx) * L.cin;
        const float* wt = L.weight + ((size_t)(ky * L.k + kx) * L.cin) * coutp + co0;
        for (int ci = 0; ci < L.cin; ++ci) {
          __m512 wv[CV];
          for (int v = 0; v < CV; ++v) wv[v] = _mm512_loadu_ps(wt + (size_t)ci * coutp + 16 * v);
          for (int j = 0; j < X; ++j) {
            const __m512 a = _mm512_set1_ps(src[(size_t)j * L.cin + ci]);
            for (int v = 0; v < CV; ++v) acc[j][v] = _mm512_fmadd_ps(a, wv[v], acc[j][v]);
          }
        }
      }
  }
  for (int j = 0; j < X; ++j)
    for (int v = 0; v < CV; ++v) {
      __m512 r = acc[j][v];
      if (L.relu) r = _mm512_max_ps(r, _mm512_setzero_ps());
      _mm512_storeu_ps(out + (size_t)(x0 + j) * coutp + co0 + 16 * v, r);
    }
}

template <int CV, bool C1>
void conv_row(const Layer& L, const float* in, int y, int co0, float* out) {
  int x = 0;
  if (CV == 1)  // one channel vector: 14 positions keep 14 FMA chains going instead of 7
    for (; x + 2 * kXB <= L.w_out; x += 2 * kXB) conv_block<2 * kXB, 1, C1>(L, in, y, x, co0, out);
  for (; x + kXB <= L.w_out; x += kXB) conv_block<kXB, CV, C1>(L, in, y, x, co0, out);
  static constexpr decltype(&conv_block<1, CV, C1>) tails[kXB] = {  // the last 1-6 positions, by their count
      nullptr, conv_block<1, CV, C1>, conv_block<2, CV, C1>, conv_block<3, CV, C1>, conv_block<4, CV, C1>,
      conv_block<5, CV, C1>, conv_block<6, CV, C1>};
  if (x < L.w_out) tails[L.w_out - x](L, in, y, x, co0, out);
}

// Where output (row r, column c, channel co) of layer L goes: into the next conv's padded input, or flat (NHWC
// order; the Python side permutes the first Linear's columns to match torch's NCHW flatten).
struct Dest {
  float* base;
  int pad, wp, c;  // next buffer's padding, padded width and channels (for a flat destination: 0, pw, cout)
  float* at(int r, int col) const { return base + ((size_t)(r + pad) * wp + col + pad) * c; }
};

// A pooled block: P pooled outputs of pooled row `row` from pooled column p0, CV channel vectors from co0. Both conv
// rows and all 2P conv columns stay in registers (2 x 2P x CV accumulators), and the 2x2 max, bias and ReLU happen
// there, so nothing goes through the scratch rows (for one or two channel vectors, where storing and re-reading
// the conv rows cost about as much as the FMAs of a first layer).
template <int P, int CV, bool C1>
void pooled_block(const Layer& L, const float* in, int row, int p0, int co0, const Dest& d) {
  constexpr int X = 2 * P;
  const int coutp = round16(L.cout), wp = L.w + 2 * L.pad, cin = C1 ? 1 : L.cin;
  __m512 acc[2][X][CV];
  for (int r = 0; r < 2; ++r)
    for (int j = 0; j < X; ++j)
      for (int v = 0; v < CV; ++v) acc[r][j][v] = _mm512_setzero_ps();
  for (int ky = 0; ky < L.k; ++ky)
    for (int kx = 0; kx < L.k; ++kx) {
      const float* src = in + ((size_t)(2 * row + ky) * wp + 2 * p0 + kx) * cin;
      const float* wt = L.weight + ((size_t)(ky * L.k + kx) * cin) * coutp + co0;
      for (int ci = 0; ci < cin; ++ci) {
        __m512 wv[CV];
        for (int v = 0; v < CV; ++v) wv[v] = _mm512_loadu_ps(wt + (size_t)ci * coutp + 16 * v);
        for (int r = 0; r < 2; ++r)
          for (int j = 0; j < X; ++j) {
            const __m512 a = _mm512_set1_ps(src[((size_t)r * wp + j) * cin + ci]);
            for (int v = 0; v < CV; ++v) acc[r][j][v] = _mm512_fmadd_ps(a, wv[v], acc[r][j][v]);
          }
      }
    }
  const int ch = std::min(CV * 16, L.cout - co0);
  for (int v = 0; v < CV; ++v) {
    const __m512 bias = _mm512_loadu_ps(L.bias + co0 + 16 * v);
    const __mmask16 m = tail_mask(ch - 16 * v);
    for (int j = 0; j < P; ++j) {
      __m512 r = _mm512_max_ps(_mm512_max_ps(acc[0][2 * j][v], acc[0][2 * j + 1][v]),
                               _mm512_max_ps(acc[1][2 * j][v], acc[1][2 * j + 1][v]));
      r = _mm512_add_ps(r, bias);  // the same bias for all four: max first, then add
      if (L.relu) r = _mm512_max_ps(r, _mm512_setzero_ps());
      if (16 * v < ch) _mm512_mask_storeu_ps(d.at(row, p0 + j) + co0 + 16 * v, m, r);
    }
  }
}

// One pooled row's channel vectors [co0, co0 + 16 CV) through pooled blocks (4 outputs for one vector, 3 for two,
// 1 for four), then the last 1-3.
template <int CV, bool C1>
void pooled_row(const Layer& L, const float* in, int row, int co0, const Dest& d) {
  constexpr int P = CV == 1 ? 4 : CV == 2 ? 3 : 1;
  const int pw = L.pw();
  int p = 0;
  for (; p + P <= pw; p += P) pooled_block<P, CV, C1>(L, in, row, p, co0, d);
  static constexpr decltype(&pooled_block<1, CV, C1>) tails[4] = {  // by the count left, which is below P <= 4
      nullptr, pooled_block<1, CV, C1>, pooled_block<2, CV, C1>, pooled_block<3, CV, C1>};
  if (p < pw) tails[pw - p](L, in, row, p, co0, d);
}

// Work item of a conv layer: one output (pooled) row x one group of `cv` channel vectors. A pooled layer works in
// registers (pooled_row); an unpooled one writes its conv row to `scratch`, then to its destination.
void conv_item(const Layer& L, const float* in, int row, int co0, int cv, const Dest& d, float* scratch) {
  if (L.pool) {
    static constexpr decltype(&pooled_row<1, false>) pooled[2][5] = {  // by (one input channel, channel vectors)
        {nullptr, pooled_row<1, false>, pooled_row<2, false>, nullptr, pooled_row<4, false>},
        {nullptr, pooled_row<1, true>, pooled_row<2, true>, nullptr, pooled_row<4, true>}};
    return pooled[L.cin == 1][cv](L, in, row, co0, d);
  }
  static constexpr decltype(&conv_row<1, false>) rows[2][5] = {  // by (one input channel, channel vectors)
      {nullptr, conv_row<1, false>, conv_row<2, false>, nullptr, conv_row<4, false>},
      {nullptr, conv_row<1, true>, conv_row<2, true>, nullptr, conv_row<4, true>}};
  rows[L.cin == 1][cv](L, in, row, co0, scratch);
  const int coutp = round16(L.cout), ch = std::min(cv * 16, L.cout - co0);
  for (int col = 0; col < L.pw(); ++col) {
    float* dst = d.at(row, col) + co0;
    for (int c = 0; c < ch; c += 16)
      _mm512_mask_storeu_ps(dst + c, tail_mask(ch - c), _mm512_loadu_ps(scratch + (size_t)col * coutp + co0 + c));
  }
}

// Output vectors [v0, v1) of a linear layer: y = W x + b (+ ReLU), 4 vectors at a time.
void linear_part(const Layer& L, const float* x, int v0, int v1, float* y) {
  const int outp = round16(L.out);
  for (int v = v0; v < v1; v += 4) {
    const int nv = std::min(4, v1 - v);
    __m512 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = j < nv ? _mm512_loadu_ps(L.bias + (v + j) * 16) : _mm512_setzero_ps();
    for (int i = 0; i < L.in; ++i) {
      const __m512 a = _mm512_set1_ps(x[i]);
      const float* w = L.weight + (size_t)i * outp + v * 16;
      for (int j = 0; j < nv; ++j) acc[j] = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 16 * j), acc[j]);
    }
    for (int j = 0; j < nv; ++j) {
      __m512 r = acc[j];
      if (L.relu) r = _mm512_max_ps(r, _mm512_setzero_ps());
      const int col = (v + j) * 16;
      _mm512_mask_storeu_ps(y + col, tail_mask(L.out - col), r);
    }
  }
}

// Split-K share of a Linear: part += W[f0 .. f0+n) x[f0 .. f0+n) over the (f0, n) feature runs `runs` hands out,
// for NV output vectors from vector v (accumulators in registers across all the runs).
template <int NV, class Runs>
void linear_partial_vectors(const Layer& L, const float* x, const Runs& runs, float* part, int v) {
  const int outp = round16(L.out);
  __m512 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
  runs([&](int f0, int n) {
    for (int f = f0; f < f0 + n; ++f) {
      const __m512 a = _mm512_set1_ps(x[f]);
      const float* w = L.weight + (size_t)f * outp + v * 16;
      for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(a, _mm512_loadu_ps(w + 16 * j), acc[j]);
    }
  });
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(part + (v + j) * 16, acc[j]);
}

template <class Runs>
void linear_partial(const Layer& L, const float* x, const Runs& runs, float* part) {
  const int vecs = round16(L.out) / 16;
  int v = 0;
  for (; v + 16 <= vecs; v += 16) linear_partial_vectors<16>(L, x, runs, part, v);
  if (vecs - v >= 8) linear_partial_vectors<8>(L, x, runs, part, v), v += 8;
  if (vecs - v >= 4) linear_partial_vectors<4>(L, x, runs, part, v), v += 4;
  if (vecs - v >= 2) linear_partial_vectors<2>(L, x, runs, part, v), v += 2;
  if (vecs - v >= 1) linear_partial_vectors<1>(L, x, runs, part, v);
}

struct Net {
  std::vector<Layer> layers;
  int threads;
  std::mutex busy;  // one forward at a time: the activation buffers are the net's own
  std::vector<Buffers> buffers;  // per thread (sample-parallel mode); buffers[0] for the split mode

  void allocate() {
    buffers.assign(threads, {});
    for (auto& b : buffers) {
      b.act.resize(layers.size() + 1);
      size_t widest = 0;
      for (size_t i = 0; i < layers.size(); ++i) {
        const Layer& L = layers[i];
        if (L.kind == 0) {
          b.act[i].assign((size_t)(L.h + 2 * L.pad) * (L.w + 2 * L.pad) * L.cin, 0.f);  // borders stay zero
          if (!L.pool) widest = std::max(widest, (size_t)L.w_out * round16(L.cout));  // one unpooled conv row
        } else {
          b.act[i].assign(round16(L.in), 0.f);
        }
      }
      b.act[layers.size()].assign(round16(layers.back().out), 0.f);  // the last layer is a Linear
      b.rows.assign(widest + 16, 0.f);
      const int first_linear = conv_count();
      if (first_linear > 0) b.partial.assign(round16(layers[first_linear].out), 0.f);
    }
  }

  Dest dest(Buffers& b, size_t i) {
    const Layer& L = layers[i];
    if (i + 1 < layers.size() && layers[i + 1].kind == 0) {
      const Layer& N = layers[i + 1];
      return {b.act[i + 1].data(), N.pad, N.w + 2 * N.pad, N.cin};
    }
    return {b.act[i + 1].data(), 0, L.pw(), L.cout};
  }

  // The conv work items of layer L: (pooled rows) x (channel groups of cv vectors).
  int conv_count() const {  // convolutions come first (a Linear follows flatten), then only Linears
    int n = 0;
    while (n < (int)layers.size() && layers[n].kind == 0) ++n;
    return n;
  }

  // NCHW sample -> the first conv's padded NHWC buffer, input rows [y0, y1] only (a thread's band needs no more).
  void load_input(Buffers& b, const float* x, int y0 = 0, int y1 = 1 << 30) {
    const Layer& L = layers[0];
    if (L.kind != 0) {
      std::memcpy(b.act[0].data(), x, sizeof(float) * L.in);
      return;
    }
    const int wp = L.w + 2 * L.pad;
    y1 = std::min(y1, L.h - 1);
    for (int y = y0; y <= y1; ++y) {
      float* row = b.act[0].data() + ((size_t)(y + L.pad) * wp + L.pad) * L.cin;
      if (L.cin == 1) {
        std::memcpy(row, x + (size_t)y * L.w, sizeof(float) * L.w);
        continue;
      }
      for (int c = 0; c < L.cin; ++c)
        for (int xx = 0; xx < L.w; ++xx) row[(size_t)xx * L.cin + c] = x[((size_t)c * L.h + y) * L.w + xx];
    }
  }

  // A conv layer's work is (pooled output rows) x (16-channel vectors), in that order; thread t of a team takes
  // the units [a, e) (split to one vector, so the threads' shares differ by at most one vector of one row).
  struct Split {
    int vecs, a, e;
    int row0() const { return a / vecs; }
    int row1() const { return (e - 1) / vecs; }
    // calls f(row, v0, v1) for each row of the share with its vector range
    template <class F>
    void rows(F&& f) const {
      for (int u = a; u < e;) {
        const int row = u / vecs, v0 = u % vecs, v1 = std::min(vecs, v0 + (e - u));
        f(row, v0, v1);
        u += v1 - v0;
      }
    }
  };
  static Split split_of(const Layer& L, int t, int team) {
    const int vecs = round16(L.cout) / 16, units = L.ph() * vecs;
    return {vecs, (int)((long)units * t / team), (int)((long)units * (t + 1) / team)};
  }
  // Each row's vectors in groups of 4, 2 or 1 (wider groups reuse each broadcast input over more FMAs).
  void conv_items(const Layer& L, const float* in, const Split& s, const Dest& d, float* scratch) const {
    s.rows([&](int row, int v0, int v1) {
      while (v0 < v1) {
        int cv = 4;
        while (v0 % cv || v0 + cv > v1) cv /= 2;
        conv_item(L, in, row, v0 * 16, cv, d, scratch);
        v0 += cv;
      }
    });
  }

  // One sample through every layer on this thread alone (`b` its own buffers).
  void forward_sample(Buffers& b, const float* x, float* y) {
    load_input(b, x);
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& L = layers[i];
      if (L.kind == 0)
        conv_items(L, b.act[i].data(), split_of(L, 0, 1), dest(b, i), b.rows.data());
      else
        linear_part(L, b.act[i].data(), 0, round16(L.out) / 16, b.act[i + 1].data());
    }
    std::memcpy(y, b.act[layers.size()].data(), sizeof(float) * layers.back().out);
  }

  // One sample split between the threads of a team, with as few barriers as the data flow allows (each costs about
  // as much as a small layer at batch 1):
  //  - the first two convolutions run as bands: each thread computes the rows of the first that its rows of the
  //    second read (a halo of a few rows computed twice), into its own buffer, so no barrier between them;
  //  - the last convolution and the first Linear run split-K: each thread multiplies the features it just produced
  //    into its own partial sums; after one barrier thread 0 adds them up;
  //  - small Linears after that (a classifier head) run on thread 0 alone, straight into y.
  // `b`: activations the team shares (buffers[0]); `own`: this thread's buffers; `all`: every thread's.
  void forward_split(Buffers& b, Buffers& own, Buffers* all, const float* x, float* y, int t, int team) {
    const int n = (int)layers.size(), nc = conv_count();
    int i = 0;
    if (nc >= 2) {  // band: layer 0 privately, for the rows of layer 1 this thread computes
      const Layer& A = layers[0];
      const Layer& B = layers[1];
      const Split sb = split_of(B, t, team);
      if (sb.a < sb.e) {
        const int r0 = sb.row0(), r1 = sb.row1();  // B's output rows (pooled)
        const int yb0 = B.pool ? 2 * r0 : r0, yb1 = B.pool ? 2 * r1 + 1 : r1;
        const int q0 = std::max(0, yb0 - B.pad), q1 = std::min(B.h - 1, yb1 + B.k - 1 - B.pad);  // A's rows
        const int ya0 = A.pool ? 2 * q0 : q0, ya1 = A.pool ? 2 * q1 + 1 : q1;
        load_input(own, x, std::max(0, ya0 - A.pad), ya1 + A.k - 1 - A.pad);
        const int va = round16(A.cout) / 16;
        conv_items(A, own.act[0].data(), {va, q0 * va, (q1 + 1) * va}, dest(own, 0), own.rows.data());
        conv_items(B, own.act[1].data(), sb, dest(b, 1), own.rows.data());
      }
      if (nc == 2) return finish_split(b, own, all, sb, y, t, team);
      i = 2;
#pragma omp barrier
    } else {
      load_input(own, x);  // every thread its own copy: no barrier before the first layer
    }
    for (; i < n; ++i) {
      const Layer& L = layers[i];
      const float* in = i == 0 ? own.act[0].data() : b.act[i].data();
      if (L.kind == 0) {
        const Split s = split_of(L, t, team);
        conv_items(L, in, s, dest(b, i), own.rows.data());
        if (i == nc - 1) return finish_split(b, own, all, s, y, t, team);
      } else {
        const int vecs = round16(L.out) / 16;
        linear_part(L, in, vecs * t / team, vecs * (t + 1) / team, b.act[i + 1].data());
      }
#pragma omp barrier
    }
    if (t == 0) std::memcpy(y, b.act[n].data(), sizeof(float) * layers.back().out);
  }

  // After this thread's items `s` of the last conv: its split-K share of the first Linear, one barrier, thread 0's
  // sum; then the remaining Linears (on thread 0 alone when small, else split with a barrier each).
  void finish_split(Buffers& b, Buffers& own, Buffers* all, const Split& s, float* y, int t, int team) {
    const int n = (int)layers.size(), nc = conv_count();
    const Layer& C = layers[nc - 1];
    const Layer& F = layers[nc];
    const int pw = C.pw();
    linear_partial(F, b.act[nc].data(), [&](auto&& run) {
      s.rows([&](int row, int v0, int v1) {
        const int ch = std::min(v1 * 16, C.cout) - v0 * 16;
        for (int col = 0; col < pw; ++col) run((row * pw + col) * C.cout + v0 * 16, ch);
      });
    }, own.partial.data());
#pragma omp barrier
    long tail = 0;
    for (int j = nc + 1; j < n; ++j) tail += (long)layers[j].in * layers[j].out;
    const bool alone = tail <= kTailMacs;  // cheaper than another barrier: thread 0 does the rest
    if (t == 0) {
      float* z = nc + 1 == n ? y : b.act[nc + 1].data();
      for (int v = 0; v < round16(F.out); v += 16) {
        __m512 sum = _mm512_loadu_ps(F.bias + v);
        for (int u = 0; u < team; ++u) sum = _mm512_add_ps(sum, _mm512_loadu_ps(all[u].partial.data() + v));
        if (F.relu) sum = _mm512_max_ps(sum, _mm512_setzero_ps());
        _mm512_mask_storeu_ps(z + v, tail_mask(F.out - v), sum);
      }
      if (alone)
        for (int j = nc + 1; j < n; ++j)
          linear_part(layers[j], b.act[j].data(), 0, round16(layers[j].out) / 16, j + 1 == n ? y : b.act[j + 1].data());
    }
    if (alone) return;
#pragma omp barrier
    for (int j = nc + 1; j < n; ++j) {
      const Layer& L = layers[j];
      const int vecs = round16(L.out) / 16;
      linear_part(L, b.act[j].data(), vecs * t / team, vecs * (t + 1) / team, b.act[j + 1].data());
#pragma omp barrier
    }
    if (t == 0) std::memcpy(y, b.act[n].data(), sizeof(float) * layers.back().out);
  }
};

}  // namespace

extern "C" {

void* nsc_create(int threads) {
  auto* n = new Net();
  n->threads = threads;
  return n;
}

void nsc_add_conv(void* handle, int cin, int cout, int k, int pad, int h, int w, int pool, int relu,
                  const float* weight, const float* bias) {
  Layer L;
  L.kind = 0, L.cin = cin, L.cout = cout, L.k = k, L.pad = pad, L.h = h, L.w = w, L.pool = pool, L.relu = relu;
  L.h_out = h + 2 * pad - k + 1, L.w_out = w + 2 * pad - k + 1;
  L.weight = weight, L.bias = bias;
  static_cast<Net*>(handle)->layers.push_back(L);
}

void nsc_add_linear(void* handle, int in, int out, int relu, const float* weight, const float* bias) {
  Layer L;
  L.kind = 1, L.in = in, L.out = out, L.relu = relu, L.weight = weight, L.bias = bias;
  static_cast<Net*>(handle)->layers.push_back(L);
}

void nsc_finish(void* handle) { static_cast<Net*>(handle)->allocate(); }

// x: [batch][sample floats] (NCHW per sample), y: [batch][out].
void nsc_forward(void* handle, const float* x, int batch, float* y) {
  auto* n = static_cast<Net*>(handle);
  std::lock_guard<std::mutex> lock(n->busy);
  const Layer& first = n->layers[0];
  const size_t in_size = first.kind == 0 ? (size_t)first.cin * first.h * first.w : first.in;
  const int out_size = n->layers.back().out;
  if (batch >= n->threads) {  // whole samples per thread
#pragma omp parallel num_threads(n->threads)
    {
      const int t = omp_get_thread_num(), team = omp_get_num_threads();
      for (int s = batch * t / team; s < batch * (t + 1) / team; ++s)
        n->forward_sample(n->buffers[t], x + s * in_size, y + (size_t)s * out_size);
    }
    return;
  }
  for (int s = 0; s < batch; ++s) {
    if (n->threads == 1) {
      n->forward_sample(n->buffers[0], x + s * in_size, y + (size_t)s * out_size);
      continue;
    }
#pragma omp parallel num_threads(n->threads)
    {
      const int t = omp_get_thread_num(), team = omp_get_num_threads();  // shared activations, own scratch rows
      if (team == 1)
        n->forward_sample(n->buffers[0], x + s * in_size, y + (size_t)s * out_size);
      else
        n->forward_split(n->buffers[0], n->buffers[t], n->buffers.data(), x + s * in_size, y + (size_t)s * out_size,
                         t, team);
    }
  }
}

void nsc_destroy(void* handle) { delete static_cast<Net*>(handle); }

}  // extern "C"
