// Fused CNTK / CNNGP kernel matrix on the CPU, as one XLA FFI custom call (float32).
//
// The same recursion as `jconvrfm/_src/kernels/fused.py` (see its module docstring): per
// output position, layer-1 covariances from metric-weighted patch Grams, then `depth` ReLU
// layers whose covariances are q x q window sums of the previous layer's, a Flatten readout
// (spatial mean). XLA's CPU code streams every intermediate of a tile through memory between
// fusions; here one pair of (row image, block of kLanes column images) runs the whole
// recursion in buffers that stay in the core's L2 cache, vectorised over the kLanes column
// images, and column blocks are spread over threads.
//
// References:
//   S. Arora et al. On Exact Computation with an Infinitely Wide Neural Net. NeurIPS 2019.
//   Y. Cho, L. K. Saul. Kernel Methods for Deep Learning. NeurIPS 2009.
//   M. Abramowitz, I. A. Stegun. Handbook of Mathematical Functions, 4.4.46 (arccos).
//   XLA FFI: https://openxla.org/xla/custom_call (the typed C++ FFI API).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
constexpr float kPi = 3.14159265358979323846f;
constexpr float kInvPi = static_cast<float>(1.0 / 3.14159265358979323846);
// Abramowitz & Stegun 4.4.46, as `fused._ACOS_COEFFS` (highest power last).
constexpr float kAcos[8] = {1.5707963050f,  -0.2145988016f, 0.0889789874f, -0.0501743046f,
                            0.0308918810f,  -0.0170881256f, 0.0066700901f, -0.0012624911f};

// kLanes floats as one GCC/Clang vector (a zmm register with AVX-512).
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
inline Vec Zero() { return Vec{} ; }

// arccos(c) for c in [-1, 1] by Abramowitz & Stegun 4.4.46 (scalar; vectorised in lane loops).
inline float Acos(float c) {
  const float x = std::fabs(c);
  float poly = kAcos[7];
  for (int e = 6; e >= 0; --e) poly = poly * x + kAcos[e];
  const float r0 = std::sqrt(std::max(1.0f - x, 0.0f)) * poly;
  return c >= 0.0f ? r0 : kPi - r0;
}

enum Padding : int64_t { kValid = 0, kSame = 1, kCircular = 2 };

// Spatial sizes of every layer and the window padding between consecutive layers.
struct Geometry {
  int q = 0;
  int depth = 0;
  Padding padding = kValid;
  std::vector<int> h, w;        // layer l: h[l] x w[l] positions
  std::vector<int> pad_h, pad_w;  // padding before, from layer l to l + 1

  int positions(int l) const { return h[l] * w[l]; }
};

Geometry MakeGeometry(int h0, int w0, int q, int depth, Padding padding) {
  Geometry g;
  g.q = q;
  g.depth = depth;
  g.padding = padding;
  g.h.push_back(h0);
  g.w.push_back(w0);
  for (int l = 0; l + 1 < depth; ++l) {
    if (padding == kValid) {
      g.pad_h.push_back(0);
      g.pad_w.push_back(0);
      g.h.push_back(g.h[l] - q + 1);
      g.w.push_back(g.w[l] - q + 1);
    } else {  // SAME and CIRCULAR keep the size; the extra row / column goes at the end.
      g.pad_h.push_back((q - 1) / 2);
      g.pad_w.push_back((q - 1) / 2);
      g.h.push_back(g.h[l]);
      g.w.push_back(g.w[l]);
    }
  }
  return g;
}

// Source indices of a length-q window ending layer `l`'s axis of `size_in` entries into
// output entry `i`, padded like the convolution (skipped zeros, or wrapped); returns how many.
inline int WindowSources(const Geometry& g, int i, int pad, int size_in, int* src) {
  int n = 0;
  for (int di = 0; di < g.q; ++di) {
    int s = i - pad + di;
    if (g.padding == kCircular) s = ((s % size_in) + size_in) % size_in;
    else if (s < 0 || s >= size_in) continue;
    src[n++] = s;
  }
  return n;
}

// q x q window sums of `in` (h[l] x w[l] x L) into `out` (h[l+1] x w[l+1] x L), padded like
// the convolution; `tmp` holds h[l+1] x w[l] x L. Separable: rows, then columns.
template <int L>
void WindowSum(const Geometry& g, int l, const float* in, float* tmp, float* out) {
  const int hi = g.h[l], wi = g.w[l], ho = g.h[l + 1], wo = g.w[l + 1];
  std::vector<int> src(g.q);
  const size_t row = static_cast<size_t>(wi) * L;
  for (int i = 0; i < ho; ++i) {
    const int n = WindowSources(g, i, g.pad_h[l], hi, src.data());
    float* t = tmp + i * row;
    if (n == 0) {
      std::fill(t, t + row, 0.0f);
      continue;
    }
    // Sum the source rows in one pass, kLanes at a time (2 or 3 rows are the common cases).
    const float* s0 = in + src[0] * row;
    const float* s1 = n > 1 ? in + src[1] * row : nullptr;
    const float* s2 = n > 2 ? in + src[2] * row : nullptr;
    if (n == 1) {
      std::copy(s0, s0 + row, t);
    } else if (n == 2) {
      for (size_t e = 0; e < row; ++e) t[e] = s0[e] + s1[e];
    } else {
      for (size_t e = 0; e < row; ++e) t[e] = s0[e] + s1[e] + s2[e];
      for (int k = 3; k < n; ++k) {
        const float* s = in + src[k] * row;
        for (size_t e = 0; e < row; ++e) t[e] += s[e];
      }
    }
  }
  std::vector<int> col_src(static_cast<size_t>(wo) * g.q), col_n(wo);
  for (int j = 0; j < wo; ++j) col_n[j] = WindowSources(g, j, g.pad_w[l], wi, &col_src[j * g.q]);
  for (int i = 0; i < ho; ++i) {
    const float* t = tmp + i * row;
    for (int j = 0; j < wo; ++j) {
      float* o = out + (static_cast<size_t>(i) * wo + j) * L;
      const int* cs = &col_src[j * g.q];
      float acc[L] = {};
      for (int k = 0; k < col_n[j]; ++k) {
        const float* s = t + static_cast<size_t>(cs[k]) * L;
        for (int e = 0; e < L; ++e) acc[e] += s[e];
      }
      for (int e = 0; e < L; ++e) o[e] = acc[e];
    }
  }
}

// Per image and layer: sqrt of the self covariance K_l(x, x) (0 where it is not positive) and
// its inverse (0 there), for `lanes` images interleaved (layout: layer, position, lane).
template <int L>
void SelfFactors(const Geometry& g, const float* k0, std::vector<float>& scratch,
                 std::vector<float>& tmp, float* sqrt_out, float* inv_out) {
  // k0: h[0] x w[0] x L layer-1 self covariances.
  std::vector<float> cur(k0, k0 + static_cast<size_t>(g.positions(0)) * L);
  size_t offset = 0;
  for (int l = 0; l < g.depth; ++l) {
    const int n = g.positions(l) * L;
    for (int k = 0; k < n; ++k) {
      const float v = cur[k];
      const float s = v > 0.0f ? std::sqrt(v) : 0.0f;
      sqrt_out[offset + k] = s;
      inv_out[offset + k] = v > 0.0f ? 1.0f / s : 0.0f;
    }
    offset += n;
    if (l + 1 < g.depth) {
      scratch.resize(static_cast<size_t>(g.positions(l + 1)) * L);
      tmp.resize(static_cast<size_t>(g.h[l + 1]) * g.w[l] * L);
      WindowSum<L>(g, l, cur.data(), tmp.data(), scratch.data());
      cur.swap(scratch);
    }
  }
}

// sqrt / inverse sqrt self-covariance factors of every layer: `s1`, `i1` per row image
// (n1 x self_size), `s2`, `i2` per column block (blocks x self_size x kLanes). `row(a, p)` and
// `col(b, p, k)` give the layer-1 self Gram of row image `a` and of lane `k` of column block `b`
// at position `p`.
struct SelfTables {
  std::vector<float> s1, i1, s2, i2;
};

template <class Row, class Col>
SelfTables MakeSelfTables(const Geometry& g, int64_t n1, int64_t blocks, int64_t self_size,
                          float inv_channels, Row row, Col col) {
  const int p0 = g.positions(0);
  SelfTables t;
  t.s1.resize(n1 * self_size);
  t.i1.resize(t.s1.size());
  t.s2.resize(blocks * self_size * kLanes);
  t.i2.resize(t.s2.size());
  std::vector<float> scratch, tmp, k0(p0), kb(static_cast<size_t>(p0) * kLanes);
  for (int64_t a = 0; a < n1; ++a) {
    for (int p = 0; p < p0; ++p) k0[p] = row(a, p) * inv_channels;
    SelfFactors<1>(g, k0.data(), scratch, tmp, &t.s1[a * self_size], &t.i1[a * self_size]);
  }
  for (int64_t b = 0; b < blocks; ++b) {
    for (int p = 0; p < p0; ++p)
      for (int k = 0; k < kLanes; ++k) kb[p * kLanes + k] = col(b, p, k) * inv_channels;
    SelfFactors<kLanes>(g, kb.data(), scratch, tmp, &t.s2[b * self_size * kLanes],
                        &t.i2[b * self_size * kLanes]);
  }
  return t;
}

// Runs `fn(w)` for workers w = 0 .. workers - 1, worker 0 on the calling thread.
template <class Fn>
void RunWorkers(int64_t workers, Fn fn) {
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(fn, w);
  fn(0);
  for (auto& th : pool) th.join();
}

struct Problem {
  Geometry g;
  int64_t n1, blocks, d;
  float inv_channels;
  bool ntk;
  const float* p1;    // (n1, P0, d) patches of the row images
  const float* mp2;   // (blocks, P0, d, kLanes) metric times patches of the column images
  const float* s1;    // (n1, layers...) sqrt K_l(x1, x1), lane width 1
  const float* i1;    // (n1, layers...) inverse
  const float* s2;    // (blocks, layers..., kLanes)
  const float* i2;
  int64_t self_size;  // sum over layers of positions
  float* out;         // (n1, blocks * kLanes)
};

// One row image `a` against one column block `b`: the whole recursion for kLanes pairs.
struct Workspace {
  std::vector<float> k12, theta, r, t, tmp;
  explicit Workspace(const Geometry& g) {
    const size_t n = static_cast<size_t>(g.positions(0)) * kLanes;
    k12.resize(n);
    theta.resize(n);
    r.resize(n);
    t.resize(n);
    tmp.resize(n);
  }
};

// The ReLU map of one position for kLanes pairs: `R`, and `Theta D + R` for the NTK, from the
// covariances `kk` and NTK `th`, the row image's sqrt / inverse sqrt variance `sa`, `ia` and
// the column images' `sb`, `ib`.
struct Relu {
  Vec r, t;
};

#if defined(__AVX512F__)
static_assert(kLanes == 16, "the AVX-512 path holds one pair block in one zmm register");

// sqrt(u) for u >= 0 from the 14-bit reciprocal square root and one Newton step (relative
// error a few float32 ulps); a quarter of the cost of vsqrtps on a zmm register.
inline __m512 Sqrt(__m512 u) {
  const __m512 y0 = _mm512_rsqrt14_ps(u);
  const __m512 uy = _mm512_mul_ps(u, y0);
  // y1 = y0 (3 - u y0^2) / 2, so sqrt(u) = u y1 = uy (3 - uy y0) / 2.
  const __m512 corr = _mm512_fnmadd_ps(uy, y0, _mm512_set1_ps(3.0f));
  const __mmask16 positive = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_maskz_mul_ps(positive, _mm512_mul_ps(uy, _mm512_set1_ps(0.5f)), corr);
}

template <bool kNtk>
inline Relu ReluPosition(const float* __restrict__ kk, const float* __restrict__ th, float sa,
                         float ia, const float* __restrict__ sb, const float* __restrict__ ib) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 k = _mm512_loadu_ps(kk);
  const __m512 sbv = _mm512_loadu_ps(sb);
  __m512 c = _mm512_mul_ps(k, _mm512_mul_ps(_mm512_set1_ps(ia), _mm512_loadu_ps(ib)));
  c = _mm512_min_ps(_mm512_max_ps(c, _mm512_set1_ps(-1.0f)), one);
  const __m512 x = _mm512_abs_ps(c);
  const __m512 s_minus = Sqrt(_mm512_sub_ps(one, x));    // sqrt(1 - |c|)
  const __m512 s_plus = Sqrt(_mm512_add_ps(one, x));     // sqrt(1 + |c|)
  const __m512 sn = _mm512_mul_ps(s_minus, s_plus);      // sin t
  __m512 poly = _mm512_set1_ps(kAcos[7]);
  for (int e = 6; e >= 0; --e) poly = _mm512_fmadd_ps(poly, x, _mm512_set1_ps(kAcos[e]));
  const __m512 r0 = _mm512_mul_ps(s_minus, poly);        // arccos |c|
  const __mmask16 negative = _mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 ang = _mm512_mask_sub_ps(r0, negative, _mm512_set1_ps(kPi), r0);
  const __m512 sav = _mm512_set1_ps(sa);
  // Both variances positive (sqrt factors are >= 0, never NaN).
  const __mmask16 ok =
      _mm512_cmp_ps_mask(_mm512_min_ps(sav, sbv), _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 norm = _mm512_mul_ps(sav, sbv);
  const __m512 diff = _mm512_mul_ps(_mm512_fnmadd_ps(ang, c, sn), _mm512_set1_ps(kInvPi));
  Relu out;
  out.r = _mm512_maskz_mov_ps(ok, _mm512_fmadd_ps(norm, diff, k));
  if (kNtk) {
    const __m512 dv = _mm512_mask_mov_ps(
        _mm512_set1_ps(0.5f), ok,
        _mm512_mul_ps(_mm512_sub_ps(_mm512_set1_ps(kPi), ang), _mm512_set1_ps(kInvPi)));
    out.t = _mm512_fmadd_ps(_mm512_loadu_ps(th), dv, out.r);
  }
  return out;
}
#else  // Portable: the compiler vectorises the lane loop.
template <bool kNtk>
inline Relu ReluPosition(const float* __restrict__ kk, const float* __restrict__ th, float sa,
                         float ia, const float* __restrict__ sb, const float* __restrict__ ib) {
  float r[kLanes], t[kLanes];
  const bool ok1 = sa > 0.0f;
  for (int k = 0; k < kLanes; ++k) {
    float c = kk[k] * (ia * ib[k]);
    c = std::min(std::max(c, -1.0f), 1.0f);
    const float sn = std::sqrt((1.0f - c) * (1.0f + c));
    const float ang = Acos(c);
    const bool ok = ok1 && sb[k] > 0.0f;
    const float norm = sa * sb[k];
    const float rv = ok ? kk[k] + norm * ((sn - ang * c) * kInvPi) : 0.0f;
    const float dv = ok ? (kPi - ang) * kInvPi : 0.5f;
    r[k] = rv;
    if (kNtk) t[k] = th[k] * dv + rv;
  }
  Relu out;
  out.r = Load(r);
  if (kNtk) out.t = Load(t);
  return out;
}

#endif  // __AVX512F__

// One row image `a` against one column block `b`: the whole recursion for kLanes pairs.
// Layer 1's covariances are formed position by position inside its ReLU pass, and the last
// layer's ReLU outputs go straight into the spatial sum; only the layers in between go
// through the (cache-resident) position buffers and window sums.
template <bool kNtk>
void Pair(const Problem& pb, int64_t a, int64_t b, Workspace& ws) {
  const Geometry& g = pb.g;
  const int64_t d = pb.d;
  const float* pa = pb.p1 + a * g.positions(0) * d;
  const float* mb = pb.mp2 + b * g.positions(0) * d * kLanes;
  const float* s1 = pb.s1 + a * pb.self_size;
  const float* i1 = pb.i1 + a * pb.self_size;
  const float* s2 = pb.s2 + b * pb.self_size * kLanes;
  const float* i2 = pb.i2 + b * pb.self_size * kLanes;
  float* k12 = ws.k12.data();
  float* theta = ws.theta.data();
  float* r = ws.r.data();
  float* t = ws.t.data();
  Vec total = Zero();
  for (int l = 0; l < g.depth; ++l) {
    const int np = g.positions(l);
    const bool last = l + 1 == g.depth;
    for (int p = 0; p < np; ++p) {
      const size_t off = static_cast<size_t>(p) * kLanes;
      float first[kLanes];
      const float* kk = k12 + off;
      const float* th = theta + off;
      if (l == 0) {
        const float* pp = pa + static_cast<size_t>(p) * d;
        const float* mm = mb + static_cast<size_t>(p) * d * kLanes;
        // Two partial sums halve the dependency chain of the d multiply-adds.
        Vec acc0 = Zero(), acc1 = Zero();
        int64_t e = 0;
        for (; e + 1 < d; e += 2) {
          acc0 += pp[e] * Load(mm + e * kLanes);
          acc1 += pp[e + 1] * Load(mm + (e + 1) * kLanes);
        }
        if (e < d) acc0 += pp[e] * Load(mm + e * kLanes);
        Store(first, (acc0 + acc1) * pb.inv_channels);
        kk = th = first;
      }
      const Relu out = ReluPosition<kNtk>(kk, th, s1[p], i1[p], s2 + off, i2 + off);
      if (last) {
        total += kNtk ? out.t : out.r;
      } else {
        Store(r + off, out.r);
        if (kNtk) Store(t + off, out.t);
      }
    }
    if (last) {
      float* o = pb.out + a * pb.blocks * kLanes + b * kLanes;
      Store(o, total * (1.0f / static_cast<float>(np)));
      return;
    }
    WindowSum<kLanes>(g, l, r, ws.tmp.data(), k12);
    if (kNtk) WindowSum<kLanes>(g, l, t, ws.tmp.data(), theta);
    s1 += np;
    i1 += np;
    s2 += static_cast<size_t>(np) * kLanes;
    i2 += static_cast<size_t>(np) * kLanes;
  }
}

ffi::Error FusedCntkImpl(ffi::Buffer<ffi::F32> p1, ffi::Buffer<ffi::F32> sq1,
                         ffi::Buffer<ffi::F32> mp2, ffi::Buffer<ffi::F32> sq2,
                         ffi::ResultBuffer<ffi::F32> out, int64_t height, int64_t width,
                         int64_t q, int64_t depth, int64_t padding, float inv_channels,
                         bool ntk, int64_t threads) {
  const auto p1_dims = p1.dimensions();
  const auto mp2_dims = mp2.dimensions();
  if (p1_dims.size() != 3 || mp2_dims.size() != 4 || mp2_dims[3] != kLanes) {
    return ffi::Error::InvalidArgument("fused_cntk: p1 must be (n1, P, d), mp2 (blocks, P, d, 16)");
  }
  if (depth < 1 || q < 1 || padding < 0 || padding > 2) {
    return ffi::Error::InvalidArgument("fused_cntk: bad depth, q or padding");
  }
  Problem pb;
  pb.g = MakeGeometry(static_cast<int>(height), static_cast<int>(width), static_cast<int>(q),
                      static_cast<int>(depth), static_cast<Padding>(padding));
  const int p0 = pb.g.positions(0);
  if (p1_dims[1] != p0 || mp2_dims[1] != p0 || p1_dims[2] != mp2_dims[2]) {
    return ffi::Error::InvalidArgument("fused_cntk: position or patch dimensions disagree");
  }
  for (int l = 0; l < pb.g.depth; ++l) {
    if (pb.g.h[l] < 1 || pb.g.w[l] < 1) {
      return ffi::Error::InvalidArgument("fused_cntk: the image is too small for this depth");
    }
  }
  pb.n1 = p1_dims[0];
  pb.blocks = mp2_dims[0];
  pb.d = p1_dims[2];
  pb.inv_channels = inv_channels;
  pb.ntk = ntk;
  pb.p1 = p1.typed_data();
  pb.mp2 = mp2.typed_data();
  pb.out = out->typed_data();
  pb.self_size = 0;
  for (int l = 0; l < pb.g.depth; ++l) pb.self_size += pb.g.positions(l);

  const float* sq1_data = sq1.typed_data();
  const float* sq2_data = sq2.typed_data();
  const SelfTables self = MakeSelfTables(
      pb.g, pb.n1, pb.blocks, pb.self_size, inv_channels,
      [&](int64_t a, int p) { return sq1_data[a * p0 + p]; },
      [&](int64_t b, int p, int k) { return sq2_data[(b * p0 + p) * kLanes + k]; });
  pb.s1 = self.s1.data();
  pb.i1 = self.i1.data();
  pb.s2 = self.s2.data();
  pb.i2 = self.i2.data();

  // Column blocks outer (their patches stay in cache over all rows), spread over threads.
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, pb.blocks));
  RunWorkers(workers, [&pb, workers](int64_t w) {
    Workspace ws(pb.g);
    for (int64_t b = w; b < pb.blocks; b += workers)
      for (int64_t a = 0; a < pb.n1; ++a) {
        if (pb.ntk) Pair<true>(pb, a, b, ws);
        else Pair<false>(pb, a, b, ws);
      }
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// Kernel and its gradients w.r.t. the patch Grams (the reverse pass the predictor AGOP needs).
// ------------------------------------------------------------------------------------------

// Adjoint of WindowSum: scatters `in` (h[l+1] x w[l+1] x L) back onto `out` (h[l] x w[l] x L),
// overwriting `out`; `tmp` holds h[l+1] x w[l] x L.
template <int L>
void WindowSumTranspose(const Geometry& g, int l, const float* in, float* tmp, float* out) {
  const int hi = g.h[l], wi = g.w[l], ho = g.h[l + 1], wo = g.w[l + 1];
  const size_t row = static_cast<size_t>(wi) * L;
  std::fill(tmp, tmp + static_cast<size_t>(ho) * row, 0.0f);
  std::fill(out, out + static_cast<size_t>(hi) * row, 0.0f);
  std::vector<int> src(g.q);
  for (int j = 0; j < wo; ++j) {
    const int n = WindowSources(g, j, g.pad_w[l], wi, src.data());
    for (int i = 0; i < ho; ++i) {
      const float* s = in + (static_cast<size_t>(i) * wo + j) * L;
      float* t = tmp + i * row;
      for (int k = 0; k < n; ++k) {
        float* dst = t + static_cast<size_t>(src[k]) * L;
        for (int e = 0; e < L; ++e) dst[e] += s[e];
      }
    }
  }
  for (int i = 0; i < ho; ++i) {
    const int n = WindowSources(g, i, g.pad_h[l], hi, src.data());
    const float* t = tmp + i * row;
    for (int k = 0; k < n; ++k) {
      float* dst = out + src[k] * row;
      for (size_t e = 0; e < row; ++e) dst[e] += t[e];
    }
  }
}

// R, D and the partial derivatives of the ReLU maps for kLanes pairs at one position, as
// `fused._relu_partials`: dR/dk12 = D, dR/dk11 = sin t s2 / (2 pi s1), dD/dk12 =
// 1 / (pi s1 s2 sin t), dD/dk11 = -cos t / (2 pi k11 sin t) (and k11 <-> k22); 0 where
// singular (a zero variance, or sin t = 0).
struct Partials {
  float r[kLanes], d[kLanes], r11[kLanes], r22[kLanes], d11[kLanes], d12[kLanes], d22[kLanes];
};

inline void ReluPartials(const float* __restrict__ kk, float sa, float ia,
                         const float* __restrict__ sb, const float* __restrict__ ib,
                         Partials& o) {
  constexpr float kInv2Pi = static_cast<float>(1.0 / (2.0 * 3.14159265358979323846));
  const bool ok1 = sa > 0.0f;
  for (int k = 0; k < kLanes; ++k) {
    float c = kk[k] * (ia * ib[k]);
    c = std::min(std::max(c, -1.0f), 1.0f);
    const float sn = std::sqrt((1.0f - c) * (1.0f + c));
    const float ang = Acos(c);
    const bool ok = ok1 && sb[k] > 0.0f;
    const bool smooth = ok && sn > 0.0f;
    const float norm = sa * sb[k];
    o.r[k] = ok ? kk[k] + norm * ((sn - ang * c) * kInvPi) : 0.0f;
    o.d[k] = ok ? (kPi - ang) * kInvPi : 0.5f;
    const float inv_sin = smooth ? 1.0f / sn : 0.0f;
    o.r11[k] = smooth ? sn * (sb[k] * ia * kInv2Pi) : 0.0f;
    o.r22[k] = smooth ? sn * (sa * ib[k] * kInv2Pi) : 0.0f;
    o.d12[k] = inv_sin * (ia * ib[k] * kInvPi);
    const float cis = c * inv_sin;
    o.d11[k] = cis * (-(ia * ia) * kInv2Pi);
    o.d22[k] = cis * (-(ib[k] * ib[k]) * kInv2Pi);
  }
}

struct GradProblem {
  Geometry g;
  int64_t n1, n2, blocks;
  float inv_channels;
  bool ntk;
  const float* g12;   // (P0, n1, n2)
  const float* s1;    // (n1, layers...) sqrt K_l(x1, x1)
  const float* i1;
  const float* s2;    // (blocks, layers..., kLanes)
  const float* i2;
  int64_t self_size;
  float* value;       // (n1, n2)
  float* a12;         // (P0, n1, n2) dK / d g12
  float* b1;          // (P0, n1, n2) dK / d g1, per pair
  float* b2;          // (P0, n1, n2) dK / d g2, per pair
};

struct GradWorkspace {
  std::vector<float> k12, theta;                 // every layer's inputs (offsets by layer)
  std::vector<float> r, t, adj12, adj11, adj22, ud, v, c11, c22, u, tmp;
  GradWorkspace(const Geometry& g, int64_t self_size) {
    const size_t n = static_cast<size_t>(g.positions(0)) * kLanes;
    k12.resize(static_cast<size_t>(self_size) * kLanes);
    theta.resize(k12.size());
    for (auto* b : {&r, &t, &adj12, &adj11, &adj22, &ud, &v, &c11, &c22, &u, &tmp}) b->resize(n);
  }
};

template <bool kNtk>
void PairGrads(const GradProblem& pb, int64_t a, int64_t b, GradWorkspace& ws) {
  const Geometry& g = pb.g;
  const int depth = g.depth;
  const int64_t n1 = pb.n1, n2 = pb.n2;
  const int p0 = g.positions(0);
  std::vector<size_t> off(depth + 1, 0);  // layer offsets into the per-layer arrays
  for (int l = 0; l < depth; ++l) off[l + 1] = off[l] + g.positions(l);
  const float* s1 = pb.s1 + a * pb.self_size;
  const float* i1 = pb.i1 + a * pb.self_size;
  const float* s2 = pb.s2 + b * pb.self_size * kLanes;
  const float* i2 = pb.i2 + b * pb.self_size * kLanes;
  // Layer-1 covariances from the Grams.
  float* k0 = ws.k12.data();
  for (int p = 0; p < p0; ++p) {
    const float* src = pb.g12 + (static_cast<size_t>(p) * n1 + a) * n2 + b * kLanes;
    for (int k = 0; k < kLanes; ++k) {
      k0[p * kLanes + k] = src[k] * pb.inv_channels;
      if (kNtk) ws.theta[p * kLanes + k] = src[k] * pb.inv_channels;
    }
  }
  // Forward: keep each layer's inputs (k12, theta); the value from the last layer.
  Vec total = Zero();
  for (int l = 0; l < depth; ++l) {
    const int np = g.positions(l);
    const bool last = l + 1 == depth;
    const float* kl = ws.k12.data() + off[l] * kLanes;
    const float* tl = ws.theta.data() + off[l] * kLanes;
    for (int p = 0; p < np; ++p) {
      const size_t o = static_cast<size_t>(p) * kLanes;
      const Relu out = ReluPosition<kNtk>(kl + o, tl + o, s1[off[l] + p], i1[off[l] + p],
                                          s2 + (off[l] + p) * kLanes,
                                          i2 + (off[l] + p) * kLanes);
      if (last) {
        total += kNtk ? out.t : out.r;
      } else {
        Store(ws.r.data() + o, out.r);
        if (kNtk) Store(ws.t.data() + o, out.t);
      }
    }
    if (!last) {
      WindowSum<kLanes>(g, l, ws.r.data(), ws.tmp.data(), ws.k12.data() + off[l + 1] * kLanes);
      if (kNtk) {
        WindowSum<kLanes>(g, l, ws.t.data(), ws.tmp.data(),
                          ws.theta.data() + off[l + 1] * kLanes);
      }
    }
  }
  const float inv_last = 1.0f / static_cast<float>(g.positions(depth - 1));
  Store(pb.value + a * n2 + b * kLanes, total * inv_last);
  // Backward. u: adjoint of the layer's output (theta D + R, or R), v: of R through the
  // next layer's covariance, c11 / c22: of the self covariances (per pair).
  Partials pt;
  for (int l = depth - 1; l >= 0; --l) {
    const int np = g.positions(l);
    const bool last = l == depth - 1;
    const float* kl = ws.k12.data() + off[l] * kLanes;
    const float* tl = ws.theta.data() + off[l] * kLanes;
    for (int p = 0; p < np; ++p) {
      const size_t o = static_cast<size_t>(p) * kLanes;
      ReluPartials(kl + o, s1[off[l] + p], i1[off[l] + p], s2 + (off[l] + p) * kLanes,
                   i2 + (off[l] + p) * kLanes, pt);
      float a12[kLanes], a11[kLanes], a22[kLanes];
      for (int k = 0; k < kLanes; ++k) {
        const float u = last ? inv_last : ws.u[o + k];
        const float adj_r = last ? u : (kNtk ? ws.v[o + k] + u : ws.v[o + k]);
        float x12 = adj_r * pt.d[k];
        float x11 = adj_r * pt.r11[k];
        float x22 = adj_r * pt.r22[k];
        if (kNtk) {
          const float adj_d = u * tl[o + k];
          x12 += adj_d * pt.d12[k];
          x11 += adj_d * pt.d11[k];
          x22 += adj_d * pt.d22[k];
        }
        if (!last) {
          x11 += ws.c11[o + k];
          x22 += ws.c22[o + k];
        }
        if (l == 0 && kNtk) x12 += u * pt.d[k];  // theta_1 = k12_1
        a12[k] = x12;
        a11[k] = x11;
        a22[k] = x22;
        if (kNtk) ws.ud[o + k] = u * pt.d[k];
      }
      if (l == 0) {
        const size_t dst = (static_cast<size_t>(p) * n1 + a) * n2 + b * kLanes;
        for (int k = 0; k < kLanes; ++k) {
          pb.a12[dst + k] = a12[k] * pb.inv_channels;
          pb.b1[dst + k] = a11[k] * pb.inv_channels;
          pb.b2[dst + k] = a22[k] * pb.inv_channels;
        }
      } else {
        std::memcpy(ws.adj12.data() + o, a12, sizeof(a12));
        std::memcpy(ws.adj11.data() + o, a11, sizeof(a11));
        std::memcpy(ws.adj22.data() + o, a22, sizeof(a22));
      }
    }
    if (l > 0) {
      WindowSumTranspose<kLanes>(g, l - 1, ws.adj12.data(), ws.tmp.data(), ws.v.data());
      WindowSumTranspose<kLanes>(g, l - 1, ws.adj11.data(), ws.tmp.data(), ws.c11.data());
      WindowSumTranspose<kLanes>(g, l - 1, ws.adj22.data(), ws.tmp.data(), ws.c22.data());
      if (kNtk) WindowSumTranspose<kLanes>(g, l - 1, ws.ud.data(), ws.tmp.data(), ws.u.data());
    }
  }
}

ffi::Error FusedCntkGradsImpl(ffi::Buffer<ffi::F32> g12, ffi::Buffer<ffi::F32> g1,
                              ffi::Buffer<ffi::F32> g2, ffi::ResultBuffer<ffi::F32> value,
                              ffi::ResultBuffer<ffi::F32> a12, ffi::ResultBuffer<ffi::F32> b1,
                              ffi::ResultBuffer<ffi::F32> b2, int64_t q, int64_t depth,
                              int64_t padding, float inv_channels, bool ntk,
                              int64_t threads) {
  const auto dims = g12.dimensions();
  if (dims.size() != 4 || dims[3] % kLanes != 0) {
    return ffi::Error::InvalidArgument(
        "fused_cntk_grads: g12 must be (H', W', n1, n2) with n2 a multiple of 16");
  }
  if (depth < 1 || q < 1 || padding < 0 || padding > 2) {
    return ffi::Error::InvalidArgument("fused_cntk_grads: bad depth, q or padding");
  }
  GradProblem pb;
  pb.g = MakeGeometry(static_cast<int>(dims[0]), static_cast<int>(dims[1]),
                      static_cast<int>(q), static_cast<int>(depth),
                      static_cast<Padding>(padding));
  for (int l = 0; l < pb.g.depth; ++l) {
    if (pb.g.h[l] < 1 || pb.g.w[l] < 1) {
      return ffi::Error::InvalidArgument("fused_cntk_grads: the maps are too small for this depth");
    }
  }
  pb.n1 = dims[2];
  pb.n2 = dims[3];
  pb.blocks = pb.n2 / kLanes;
  pb.inv_channels = inv_channels;
  pb.ntk = ntk;
  pb.g12 = g12.typed_data();
  pb.value = value->typed_data();
  pb.a12 = a12->typed_data();
  pb.b1 = b1->typed_data();
  pb.b2 = b2->typed_data();
  pb.self_size = 0;
  for (int l = 0; l < pb.g.depth; ++l) pb.self_size += pb.g.positions(l);
  const float* g1_data = g1.typed_data();
  const float* g2_data = g2.typed_data();
  const SelfTables self = MakeSelfTables(
      pb.g, pb.n1, pb.blocks, pb.self_size, inv_channels,
      [&](int64_t a, int p) { return g1_data[p * pb.n1 + a]; },
      [&](int64_t b, int p, int k) { return g2_data[p * pb.n2 + b * kLanes + k]; });
  pb.s1 = self.s1.data();
  pb.i1 = self.i1.data();
  pb.s2 = self.s2.data();
  pb.i2 = self.i2.data();
  // Work items (column block, row) in column-block-major order, split into contiguous ranges.
  const int64_t items = pb.blocks * pb.n1;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, items));
  RunWorkers(workers, [&pb, items, workers](int64_t w) {
    GradWorkspace ws(pb.g, pb.self_size);
    const int64_t first = items * w / workers, end = items * (w + 1) / workers;
    for (int64_t it = first; it < end; ++it) {
      const int64_t b = it / pb.n1, a = it % pb.n1;
      if (pb.ntk) PairGrads<true>(pb, a, b, ws);
      else PairGrads<false>(pb, a, b, ws);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JconvrfmFusedCntkF32, FusedCntkImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // p1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sq1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mp2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sq2
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int64_t>("height")
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("q")
                                  .Attr<int64_t>("depth")
                                  .Attr<int64_t>("padding")
                                  .Attr<float>("inv_channels")
                                  .Attr<bool>("ntk")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JconvrfmFusedCntkGradsF32, FusedCntkGradsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g12 (H', W', n1, n2)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g1 (H', W', n1)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g2 (H', W', n2)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // K (n1, n2)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dK/dg12 (H', W', n1, n2)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dK/dg1 per pair
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dK/dg2 per pair
                                  .Attr<int64_t>("q")
                                  .Attr<int64_t>("depth")
                                  .Attr<int64_t>("padding")
                                  .Attr<float>("inv_channels")
                                  .Attr<bool>("ntk")
                                  .Attr<int64_t>("threads"));
