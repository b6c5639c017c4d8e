// netshrink's native forward for small float32 CNNs: a chain of Conv2d (stride 1, square kernel, zero padding)
// + optional ReLU + optional 2x2 max pooling, then Linear (+ ReLU) layers, as structured pruning leaves them.
//
// At batch 1 a pruned CNN is small enough that a framework's fixed cost per operator (dispatch, a thread pool
// hand-off per layer) outweighs its arithmetic, so cutting FLOPs stops cutting time. Here a whole forward is one
// call: activations are NHWC with the zero padding built into each layer's input buffer, a convolution keeps
// 7 output positions x up to 4 vectors of 16 output channels in registers (28 FMA chains), and the ReLU and the
// pooling run on the two conv rows a pooled row needs, while they are in L1. With one sample, the threads of an
// OpenMP team (torch's libgomp, as in quant/encode.cpp) split each layer's pooled rows x channel groups and meet
// at a barrier between layers; with several samples each thread takes whole samples and never waits.
// The Python side (native/cnn.py) reads the model, lays out the weights and checks shapes.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

using netshrink::tail_mask;

constexpr int kXB = 7;  // output positions per register block

inline int round16(int x) { return (x + 15) / 16 * 16; }

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
  std::vector<std::vector<float>> act;  // act[i]: layer i's input (padded NHWC for a conv, flat for a linear)
  std::vector<float> rows;              // scratch: two conv output rows
};

// One register block: X output positions starting at column x0 of conv output row y, CV vectors of output channels
// from co0, over the whole kernel window; bias and ReLU applied, stored to out[x][co] (row of w_out x coutp).
template <int X, int CV>
inline void conv_block(const Layer& L, const float* in, int y, int x0, int co0, float* out) {
  const int coutp = round16(L.cout), wp = L.w + 2 * L.pad;
  __m512 acc[X][CV];
  for (int v = 0; v < CV; ++v) {
    const __m512 b = _mm512_loadu_ps(L.bias + co0 + 16 * v);
    for (int j = 0; j < X; ++j) acc[j][v] = b;
  }
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
  for (int j = 0; j < X; ++j)
    for (int v = 0; v < CV; ++v) {
      __m512 r = acc[j][v];
      if (L.relu) r = _mm512_max_ps(r, _mm512_setzero_ps());
      _mm512_storeu_ps(out + (size_t)(x0 + j) * coutp + co0 + 16 * v, r);
    }
}

template <int CV>
void conv_row(const Layer& L, const float* in, int y, int co0, float* out) {
  int x = 0;
  if (CV == 1)  // one channel vector: 14 positions keep 14 FMA chains going instead of 7
    for (; x + 2 * kXB <= L.w_out; x += 2 * kXB) conv_block<2 * kXB, 1>(L, in, y, x, co0, out);
  for (; x + kXB <= L.w_out; x += kXB) conv_block<kXB, CV>(L, in, y, x, co0, out);
  static constexpr decltype(&conv_block<1, CV>) tails[kXB] = {  // the last 1-6 positions, by their count
      nullptr, conv_block<1, CV>, conv_block<2, CV>, conv_block<3, CV>, conv_block<4, CV>, conv_block<5, CV>,
      conv_block<6, CV>};
  if (x < L.w_out) tails[L.w_out - x](L, in, y, x, co0, out);
}

// Where output (row r, column c, channel co) of layer L goes: into the next conv's padded input, or flat (NHWC
// order; the Python side permutes the first Linear's columns to match torch's NCHW flatten).
struct Dest {
  float* base;
  int pad, wp, c;  // next buffer's padding, padded width and channels (for a flat destination: 0, pw, cout)
  float* at(int r, int col) const { return base + ((size_t)(r + pad) * wp + col + pad) * c; }
};

// Work item i of a conv layer: one output (pooled) row x one group of `cv` channel vectors.
void conv_item(const Layer& L, const float* in, int row, int co0, int cv, const Dest& d, float* scratch) {
  const int coutp = round16(L.cout), n = cv * 16;
  const int conv_rows = L.pool ? 2 : 1;
  for (int r = 0; r < conv_rows; ++r) {
    float* out = scratch + (size_t)r * L.w_out * coutp;
    const int y = row * conv_rows + r;
    switch (cv) {
      case 4: conv_row<4>(L, in, y, co0, out); break;
      case 2: conv_row<2>(L, in, y, co0, out); break;
      default: conv_row<1>(L, in, y, co0, out); break;
    }
  }
  const int ch = std::min(n, L.cout - co0);
  for (int col = 0; col < L.pw(); ++col) {
    float* dst = d.at(row, col) + co0;
    for (int c = 0; c < ch; c += 16) {
      const __mmask16 m = tail_mask(ch - c);
      __m512 v;
      if (L.pool) {
        const float* a = scratch + (size_t)(2 * col) * coutp + co0 + c;
        const float* b = scratch + ((size_t)L.w_out + 2 * col) * coutp + co0 + c;
        v = _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(a + coutp)),
                          _mm512_max_ps(_mm512_loadu_ps(b), _mm512_loadu_ps(b + coutp)));
      } else {
        v = _mm512_loadu_ps(scratch + (size_t)col * coutp + co0 + c);
      }
      _mm512_mask_storeu_ps(dst + c, m, v);
    }
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

struct Net {
  std::vector<Layer> layers;
  int threads;
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
          widest = std::max(widest, (size_t)2 * L.w_out * round16(L.cout));
        } else {
          b.act[i].assign(round16(L.in), 0.f);
        }
      }
      b.act[layers.size()].assign(round16(layers.back().out), 0.f);  // the last layer is a Linear
      b.rows.assign(widest + 16, 0.f);
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
  static int channel_vectors(const Layer& L, int team) {
    const int vecs = round16(L.cout) / 16;
    for (int cv : {4, 2})  // the widest group that still splits evenly between the threads
      if (vecs % cv == 0 && (team == 1 || (L.ph() * (vecs / cv)) % team == 0)) return cv;
    return 1;
  }

  void load_input(Buffers& b, const float* x) {  // NCHW sample -> the first conv's padded NHWC buffer
    const Layer& L = layers[0];
    if (L.kind != 0) {
      std::memcpy(b.act[0].data(), x, sizeof(float) * L.in);
      return;
    }
    const int wp = L.w + 2 * L.pad;
    for (int c = 0; c < L.cin; ++c)
      for (int y = 0; y < L.h; ++y)
        for (int xx = 0; xx < L.w; ++xx)
          b.act[0][((size_t)(y + L.pad) * wp + xx + L.pad) * L.cin + c] = x[((size_t)c * L.h + y) * L.w + xx];
  }

  // One sample through every layer; threads t of team split each layer (barrier between layers).
  // `own`: this thread's buffers (its copy of the input, its scratch rows); `b`: the activations the team shares.
  void forward_sample(Buffers& b, Buffers& own, const float* x, float* y, int t, int team, bool split) {
    load_input(own, x);  // every thread its own copy: no barrier before the first layer
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& L = layers[i];
      const Dest d = dest(b, i);
      const float* in = i == 0 ? own.act[0].data() : b.act[i].data();
      if (L.kind == 0) {
        const int cv = channel_vectors(L, split ? team : 1);
        const int groups = round16(L.cout) / 16 / cv, items = L.ph() * groups;
        const int a = split ? items * t / team : 0, e = split ? items * (t + 1) / team : items;
        for (int it = a; it < e; ++it) conv_item(L, in, it / groups, (it % groups) * cv * 16, cv, d, own.rows.data());
      } else {
        const int vecs = round16(L.out) / 16;
        const int a = split ? vecs * t / team : 0, e = split ? vecs * (t + 1) / team : vecs;
        linear_part(L, in, a, e, b.act[i + 1].data());
      }
      if (split) {
#pragma omp barrier
      }
    }
    if (!split || t == 0) std::memcpy(y, b.act[layers.size()].data(), sizeof(float) * layers.back().out);
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
  const Layer& first = n->layers[0];
  const size_t in_size = first.kind == 0 ? (size_t)first.cin * first.h * first.w : first.in;
  const int out_size = n->layers.back().out;
  if (batch >= n->threads) {  // whole samples per thread
#pragma omp parallel num_threads(n->threads)
    {
      const int t = omp_get_thread_num(), team = omp_get_num_threads();
      for (int s = batch * t / team; s < batch * (t + 1) / team; ++s)
        n->forward_sample(n->buffers[t], n->buffers[t], x + s * in_size, y + (size_t)s * out_size, t, team, false);
    }
    return;
  }
  for (int s = 0; s < batch; ++s) {
#pragma omp parallel num_threads(n->threads)
    {
      const int t = omp_get_thread_num(), team = omp_get_num_threads();  // shared activations, own scratch rows
      n->forward_sample(n->buffers[0], n->buffers[t], x + s * in_size, y + (size_t)s * out_size, t, team, team > 1);
    }
  }
}

void nsc_destroy(void* handle) { delete static_cast<Net*>(handle); }

}  // extern "C"
