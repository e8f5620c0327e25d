// Fused CNTK / CNNGP kernel matrix on the CPU, as one XLA FFI custom call (float32).
//
// The same recursion as `jconvrfm/_src/kernels/fused.py` (see its module docstring): per
// output position, layer-1 covariances from metric-weighted patch Grams, then `depth` ReLU
// layers whose covariances are q x q window sums of the previous layer's, a Flatten readout
// (spatial mean). XLA's CPU code streams every intermediate of a tile through memory between
// fusions; here one pair of (row image, block of kLanes column images) runs the whole
// recursion in buffers that stay in the core's L2 cache, vectorised over the kLanes column
// images, and column blocks are spread over threads. The same recursion's hand-written reverse
// pass (`ReversePass`) serves two more handlers: the kernel's gradients w.r.t. the patch Grams,
// and the fused patch AGOP of a kernel predictor, which contracts each pair block's gradients
// with the training patches while they are still in cache. A last handler is a class-weighted
// per-position GEMM, the contraction of the feature-space AGOP (`WeightedPositionGemmImpl`).
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
#include <type_traits>
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

// Calls fn(std::integral_constant<int, n>) for n in [1, 8] (n > 8 is taken as 8): a runtime
// count turned into a compile-time one, for register-tiled loops.
template <class Fn>
inline void WithCount8(int64_t n, Fn fn) {
  switch (n) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

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
// A sum of input entries per output entry along one axis: output `i` adds the inputs
// `src[start[i] .. start[i + 1])` (a compressed sparse row table).
struct Gather1D {
  std::vector<int> start, src;
  int size() const { return static_cast<int>(start.size()) - 1; }
};

struct Geometry {
  int q = 0;
  int depth = 0;
  Padding padding = kValid;
  std::vector<int> h, w;        // layer l: h[l] x w[l] positions
  std::vector<int> pad_h, pad_w;  // padding before, from layer l to l + 1
  // Window sums from layer l to l + 1 along each axis and their adjoints, as gathers.
  std::vector<Gather1D> sum_h, sum_w, adj_h, adj_w;

  int positions(int l) const { return h[l] * w[l]; }
};

// Sources of a length-q window of an axis of `size_in` entries into output entry `i`,
// padded like the convolution (skipped zeros, or wrapped).
std::vector<int> WindowSources(int q, Padding padding, int i, int pad, int size_in) {
  std::vector<int> src;
  for (int di = 0; di < q; ++di) {
    int s = i - pad + di;
    if (padding == kCircular) s = ((s % size_in) + size_in) % size_in;
    else if (s < 0 || s >= size_in) continue;
    src.push_back(s);
  }
  return src;
}

// The window sum along one axis (`adjoint` false) or its adjoint, which scatters each output
// back onto its window: as a gather, input `i` of the sum feeds output `s` of the adjoint.
Gather1D WindowGather(int q, Padding padding, int pad, int size_in, int size_out, bool adjoint) {
  std::vector<std::vector<int>> lists(adjoint ? size_in : size_out);
  for (int i = 0; i < size_out; ++i) {
    for (int s : WindowSources(q, padding, i, pad, size_in)) {
      if (adjoint) lists[s].push_back(i);
      else lists[i].push_back(s);
    }
  }
  Gather1D out;
  out.start.push_back(0);
  for (const auto& l : lists) {
    out.src.insert(out.src.end(), l.begin(), l.end());
    out.start.push_back(static_cast<int>(out.src.size()));
  }
  return out;
}

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
  for (int l = 0; l < depth; ++l) {
    if (g.h[l] < 1 || g.w[l] < 1) return g;  // rejected by the caller
  }
  for (int l = 0; l + 1 < depth; ++l) {
    for (bool adjoint : {false, true}) {
      (adjoint ? g.adj_h : g.sum_h).push_back(
          WindowGather(q, padding, g.pad_h[l], g.h[l], g.h[l + 1], adjoint));
      (adjoint ? g.adj_w : g.sum_w).push_back(
          WindowGather(q, padding, g.pad_w[l], g.w[l], g.w[l + 1], adjoint));
    }
  }
  return g;
}

// Separable 2-D gather of `in` (rows.size-in x cols-in x L) into `out` (rows.size() x
// cols.size() x L): rows first into `tmp` (rows.size() x cols_in x L), then columns.
template <int L>
void Gather2D(const Gather1D& rows, const Gather1D& cols, int cols_in, const float* in,
              float* tmp, float* out) {
  const size_t row = static_cast<size_t>(cols_in) * L;
  for (int i = 0; i < rows.size(); ++i) {
    const int* src = rows.src.data() + rows.start[i];
    const int n = rows.start[i + 1] - rows.start[i];
    float* t = tmp + i * row;
    if (n == 0) {
      std::fill(t, t + row, 0.0f);
      continue;
    }
    // Sum the source rows in one pass (2 or 3 rows are the common cases).
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
  const int wo = cols.size();
  for (int i = 0; i < rows.size(); ++i) {
    const float* t = tmp + i * row;
    for (int j = 0; j < wo; ++j) {
      float* o = out + (static_cast<size_t>(i) * wo + j) * L;
      if constexpr (L == kLanes) {  // one vector register (a float[16] loop went scalar)
        Vec acc = Zero();
        for (int k = cols.start[j]; k < cols.start[j + 1]; ++k)
          acc += Load(t + static_cast<size_t>(cols.src[k]) * L);
        Store(o, acc);
      } else {
        float acc[L] = {};
        for (int k = cols.start[j]; k < cols.start[j + 1]; ++k) {
          const float* s = t + static_cast<size_t>(cols.src[k]) * L;
          for (int e = 0; e < L; ++e) acc[e] += s[e];
        }
        for (int e = 0; e < L; ++e) o[e] = acc[e];
      }
    }
  }
}

// q x q window sums of `in` (h[l] x w[l] x L) into `out` (h[l+1] x w[l+1] x L), padded like
// the convolution; `tmp` holds h[l+1] x w[l] x L.
template <int L>
void WindowSum(const Geometry& g, int l, const float* in, float* tmp, float* out) {
  Gather2D<L>(g.sum_h[l], g.sum_w[l], g.w[l], in, tmp, out);
}

// Adjoint of WindowSum: scatters `in` (h[l+1] x w[l+1] x L) back onto `out` (h[l] x w[l] x L),
// as a gather; `tmp` holds h[l] x w[l+1] x L.
template <int L>
void WindowSumTranspose(const Geometry& g, int l, const float* in, float* tmp, float* out) {
  Gather2D<L>(g.adj_h[l], g.adj_w[l], g.w[l + 1], in, tmp, out);
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
  int64_t self_size = 0;  // sum over layers of positions

  // Points a problem's `s1`, `i1`, `s2`, `i2` and `self_size` at these tables.
  template <class Problem>
  void AttachTo(Problem& pb) const {
    pb.s1 = s1.data();
    pb.i1 = i1.data();
    pb.s2 = s2.data();
    pb.i2 = i2.data();
    pb.self_size = self_size;
  }
};

template <class Row, class Col>
SelfTables MakeSelfTables(const Geometry& g, int64_t n1, int64_t blocks, float inv_channels,
                          Row row, Col col) {
  const int p0 = g.positions(0);
  SelfTables t;
  int64_t self_size = 0;
  for (int l = 0; l < g.depth; ++l) self_size += g.positions(l);
  t.self_size = self_size;
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

// MakeSelfTables for row self Grams `sq1` (n1, P0) and column ones `sq2` (blocks, P0, kLanes).
SelfTables LaneLayoutSelfTables(const Geometry& g, int64_t n1, int64_t blocks,
                                float inv_channels, const float* sq1, const float* sq2) {
  const int p0 = g.positions(0);
  return MakeSelfTables(
      g, n1, blocks, inv_channels, [&](int64_t a, int p) { return sq1[a * p0 + p]; },
      [&](int64_t b, int p, int k) { return sq2[(b * p0 + p) * kLanes + k]; });
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
  int64_t first_row;  // < 0: every pair; else row a is image first_row + a of a symmetric
                      // matrix and only column blocks reaching its diagonal are computed
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
// the column images' `sb`, `ib`. Lanes whose bit is set in `same` pair an image with itself:
// their correlation is taken as exactly 1 (not a rounding of it), so that the derivative
// conventions at coinciding inputs apply.
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
                         float ia, const float* __restrict__ sb, const float* __restrict__ ib,
                         uint32_t same = 0) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 k = _mm512_loadu_ps(kk);
  const __m512 sbv = _mm512_loadu_ps(sb);
  __m512 c = _mm512_mul_ps(k, _mm512_mul_ps(_mm512_set1_ps(ia), _mm512_loadu_ps(ib)));
  c = _mm512_min_ps(_mm512_max_ps(c, _mm512_set1_ps(-1.0f)), one);
  c = _mm512_mask_mov_ps(c, static_cast<__mmask16>(same), one);
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
                         float ia, const float* __restrict__ sb, const float* __restrict__ ib,
                         uint32_t same = 0) {
  float r[kLanes], t[kLanes];
  const bool ok1 = sa > 0.0f;
  for (int k = 0; k < kLanes; ++k) {
    float c = kk[k] * (ia * ib[k]);
    c = std::min(std::max(c, -1.0f), 1.0f);
    if ((same >> k) & 1u) c = 1.0f;
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

// Patch inner products `sum_e row[e] col[e][k]` of one row patch (d) with kLanes column
// patches (d x kLanes, lanes minor). Two partial sums halve the dependency chain.
inline Vec LaneGram(const float* row, const float* col, int64_t d) {
  Vec acc0 = Zero(), acc1 = Zero();
  int64_t e = 0;
  for (; e + 1 < d; e += 2) {
    acc0 += row[e] * Load(col + e * kLanes);
    acc1 += row[e + 1] * Load(col + (e + 1) * kLanes);
  }
  if (e < d) acc0 += row[e] * Load(col + e * kLanes);
  return acc0 + acc1;
}

// One row image `a` against one column block `b`: the whole recursion for kLanes pairs.
// Layer 1's covariances are formed position by position inside its ReLU pass (from the
// patches; with `kGramIn`, read from `ws.k12`, where the caller has put them, scaled), and the
// last layer's ReLU outputs go straight into the spatial sum; only the layers in between go
// through the (cache-resident) position buffers and window sums.
template <bool kNtk, bool kGramIn = false>
void Pair(const Problem& pb, int64_t a, int64_t b, Workspace& ws) {
  const Geometry& g = pb.g;
  const int64_t d = pb.d;
  const float* pa = kGramIn ? nullptr : pb.p1 + a * g.positions(0) * d;
  const float* mb = kGramIn ? nullptr : pb.mp2 + b * g.positions(0) * d * kLanes;
  const float* s1 = pb.s1 + a * pb.self_size;
  const float* i1 = pb.i1 + a * pb.self_size;
  const float* s2 = pb.s2 + b * pb.self_size * kLanes;
  const float* i2 = pb.i2 + b * pb.self_size * kLanes;
  float* k12 = ws.k12.data();
  float* theta = ws.theta.data();
  float* r = ws.r.data();
  float* t = ws.t.data();
  // In a symmetric matrix, the lane holding the row image itself: correlation exactly 1 (a
  // float32 rounding of it would move arccos, hence K(x, x), by about 1e-4).
  const int64_t self_lane = pb.first_row < 0 ? -1 : pb.first_row + a - b * kLanes;
  const uint32_t same = self_lane >= 0 && self_lane < kLanes ? 1u << self_lane : 0u;
  Vec total = Zero();
  for (int l = 0; l < g.depth; ++l) {
    const int np = g.positions(l);
    const bool last = l + 1 == g.depth;
    for (int p = 0; p < np; ++p) {
      const size_t off = static_cast<size_t>(p) * kLanes;
      float first[kLanes];
      const float* kk = k12 + off;
      const float* th = theta + off;
      if constexpr (!kGramIn) {
        if (l == 0) {
          const Vec gram = LaneGram(pa + static_cast<size_t>(p) * d,
                                    mb + static_cast<size_t>(p) * d * kLanes, d);
          Store(first, gram * pb.inv_channels);
          kk = th = first;
        }
      } else {
        if (l == 0) th = kk;  // layer 1: Theta = K
      }
      const Relu out = ReluPosition<kNtk>(kk, th, s1[p], i1[p], s2 + off, i2 + off, same);
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
                         ffi::Buffer<ffi::S32> first_row, ffi::ResultBuffer<ffi::F32> out, int64_t height, int64_t width,
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
  if (first_row.element_count() != 1) {
    return ffi::Error::InvalidArgument("fused_cntk: first_row must be a scalar");
  }
  pb.first_row = first_row.typed_data()[0];

  const SelfTables self =
      LaneLayoutSelfTables(pb.g, pb.n1, pb.blocks, inv_channels, sq1.typed_data(),
                           sq2.typed_data());
  self.AttachTo(pb);

  // Column blocks outer (their patches stay in cache over all rows), spread over threads.
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, pb.blocks));
  RunWorkers(workers, [&pb, workers](int64_t w) {
    Workspace ws(pb.g);
    for (int64_t b = w; b < pb.blocks; b += workers)
      for (int64_t a = 0; a < pb.n1; ++a) {
        if (pb.first_row >= 0 && pb.first_row + a >= (b + 1) * kLanes) {
          // Wholly below the diagonal of a symmetric matrix: mirrored by the caller.
          std::fill_n(pb.out + a * pb.blocks * kLanes + b * kLanes, kLanes, 0.0f);
        } else if (pb.ntk) {
          Pair<true>(pb, a, b, ws);
        } else {
          Pair<false>(pb, a, b, ws);
        }
      }
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// The identity-metric kernel from pixels (deep layers with many channels).
// ------------------------------------------------------------------------------------------
//
// With M = I, layer 1's covariance at a position is the q x q window sum of per-pixel channel
// inner products (`fused._grams_identity`): q^2 fewer multiply-adds than patch Grams, and the
// operands are the images themselves, not q^2-fold patch arrays. The per-pixel Grams are a
// batched matrix product (one per pixel, channels contracted); they are computed for a tile of
// `row_tile` row images against `group` column blocks, pixel by pixel, so that each pixel's
// column data (C x kLanes floats per block) is read from memory once per row tile and each row
// image's once per group, then each pair block's window sum and recursion run as in `Pair`.
// Each worker lays its current group's column images out lanes-minor in a buffer of its own,
// so the caller passes the images as they are (no copy of them all in lane layout).
// `first_q` is layer 1's window (q for images); 1 for per-position patch features `F^T p`
// with `F F^T = M` (a learned metric on many channels), whose inner products are layer 1's
// covariances on a grid that already is layer 1's.

struct PixelProblem {
  Problem pb;              // the recursion (pb.p1, pb.mp2, pb.d unused)
  Gather1D sum_h, sum_w;   // window sums from the pixel grid to layer 1's positions
  int64_t pixels = 0, w_in = 0, channels = 0;
  const float* x1 = nullptr;  // (n1, pixels, C) row images
  const float* x2 = nullptr;  // (n2, pixels, C) column images
  int64_t n2 = 0;
  int64_t row_tile = 0, group = 0;
};

// out[r + b] = sum_e rows[r][e] * col_b[e] (lanes) for R row pixels against B column blocks'
// pixels (col_b = col0 + b col_step; out for block b at `next` floats from block b - 1's), in
// B R vector accumulators: each row value broadcast feeds B multiply-adds. Every (row, block)
// sums its channels in the same order whatever B and R, so results do not depend on them.
template <int B, int R>
inline void PixelGrams(const float* const* rows, const float* col0, size_t col_step, int64_t c,
                       float scale, float* out, size_t stride, size_t next) {
  Vec acc[B][R];
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = Zero();
  for (int64_t e = 0; e < c; ++e) {
    Vec cv[B];
    for (int b = 0; b < B; ++b) cv[b] = Load(col0 + b * col_step + e * kLanes);
    for (int r = 0; r < R; ++r) {
      const float v = rows[r][e];
      for (int b = 0; b < B; ++b) acc[b][r] += v * cv[b];
    }
  }
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < R; ++r) Store(out + r * stride + b * next, acc[b][r] * scale);
}

// Rows per micro-kernel call (with two column blocks, 16 accumulators: half the AVX-512
// registers). Four blocks of four rows ran 10-15% slower (30x30x128 maps, 2-core Xeon).
constexpr int kPixelRows = 8;

// Column images of blocks b0 .. b0 + nb - 1 into `cols` (nb, pixels, C, kLanes); images past
// n2 are zero images (zero variances: finite, zero kernel columns, dropped by the caller).
void LayOutColumns(const PixelProblem& pp, int64_t b0, int64_t nb, std::vector<float>& cols) {
  const int64_t size = pp.channels * pp.pixels;  // floats per image
  constexpr int64_t kChunk = 256;  // floats per image per pass: 16 KB of output stays in L1
  for (int64_t gb = 0; gb < nb; ++gb) {
    float* out = cols.data() + gb * size * kLanes;
    for (int64_t i0 = 0; i0 < size; i0 += kChunk) {
      const int64_t i1 = std::min(size, i0 + kChunk);
      for (int k = 0; k < kLanes; ++k) {
        const int64_t image = (b0 + gb) * kLanes + k;
        const float* in = image < pp.n2 ? pp.x2 + image * size : nullptr;
        for (int64_t i = i0; i < i1; ++i) out[i * kLanes + k] = in ? in[i] : 0.0f;
      }
    }
  }
}

template <bool kNtk>
void PixelTile(const PixelProblem& pp, const std::vector<float>& cols, int64_t a0, int64_t na,
               int64_t b0, int64_t nb, std::vector<float>& grams, std::vector<float>& tmp,
               Workspace& ws) {
  const Problem& pb = pp.pb;
  const int64_t c = pp.channels, pixels = pp.pixels;
  const auto needed = [&pb](int64_t a, int64_t b) {
    return pb.first_row < 0 || pb.first_row + a < (b + 1) * kLanes;
  };
  bool any = false;
  for (int64_t b = b0; b < b0 + nb && !any; ++b) any = needed(a0, b);  // row a0 is the lowest
  // grams: (na, nb, pixels, kLanes).
  const size_t pair_size = static_cast<size_t>(pixels) * kLanes;
  const size_t stride = static_cast<size_t>(nb) * pair_size;  // from row r to r + 1
  if (any) {
    const size_t col_step = static_cast<size_t>(pixels) * c * kLanes;
    // The Grams of all tile rows against column blocks gb .. gb + B - 1 at pixel px.
    const auto blocks = [&](auto bc, int64_t px, int64_t gb) {
      constexpr int B = decltype(bc)::value;
      const float* rows[kPixelRows];
      const float* col0 = cols.data() + gb * col_step + px * c * kLanes;
      for (int64_t r0 = 0; r0 < na; r0 += kPixelRows) {
        const int64_t nr = std::min<int64_t>(kPixelRows, na - r0);
        for (int64_t r = 0; r < nr; ++r) rows[r] = pp.x1 + ((a0 + r0 + r) * pixels + px) * c;
        float* out = grams.data() + r0 * stride + gb * pair_size + px * kLanes;
        WithCount8(nr, [&](auto rc) {
          PixelGrams<B, decltype(rc)::value>(rows, col0, col_step, c, pb.inv_channels, out,
                                             stride, pair_size);
        });
      }
    };
    for (int64_t px = 0; px < pixels; ++px) {
      int64_t gb = 0;
      for (; gb + 1 < nb; gb += 2) blocks(std::integral_constant<int, 2>{}, px, gb);
      for (; gb < nb; ++gb) blocks(std::integral_constant<int, 1>{}, px, gb);
    }
  }
  for (int64_t r = 0; r < na; ++r) {
    for (int64_t gb = 0; gb < nb; ++gb) {
      const int64_t a = a0 + r, b = b0 + gb;
      if (!needed(a, b)) {  // wholly below the diagonal of a symmetric matrix: mirrored
        std::fill_n(pb.out + a * pb.blocks * kLanes + b * kLanes, kLanes, 0.0f);
        continue;
      }
      Gather2D<kLanes>(pp.sum_h, pp.sum_w, static_cast<int>(pp.w_in),
                       grams.data() + r * stride + gb * pair_size, tmp.data(), ws.k12.data());
      Pair<kNtk, true>(pb, a, b, ws);
    }
  }
}

ffi::Error FusedCntkPixelsImpl(ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> sq1,
                               ffi::Buffer<ffi::F32> x2, ffi::Buffer<ffi::F32> sq2,
                               ffi::Buffer<ffi::S32> first_row, ffi::ResultBuffer<ffi::F32> out,
                               int64_t height, int64_t width, int64_t q, int64_t depth,
                               int64_t padding, float inv_channels, bool ntk, int64_t threads,
                               int64_t row_tile, int64_t group, int64_t first_q) {
  const auto x1_dims = x1.dimensions();
  const auto x2_dims = x2.dimensions();
  if (x1_dims.size() != 3 || x2_dims.size() != 3 || x1_dims[1] != x2_dims[1] ||
      x1_dims[2] != x2_dims[2] || x1_dims[1] != height * width) {
    return ffi::Error::InvalidArgument(
        "fused_cntk_pixels: x1 must be (n1, H W, C), x2 (n2, H W, C)");
  }
  if (depth < 1 || q < 1 || first_q < 1 || padding < 0 || padding > 2 || row_tile < 1 ||
      group < 1) {
    return ffi::Error::InvalidArgument("fused_cntk_pixels: bad depth, q, padding or tiles");
  }
  const Padding pad_mode = static_cast<Padding>(padding);
  const int h_in = static_cast<int>(height), w_in = static_cast<int>(width);
  // Layer 1 sums first_q x first_q windows of the per-pixel Grams (q for images; 1 for
  // per-position patch features, whose grid already is layer 1's), later layers q x q.
  const int fq = static_cast<int>(first_q);
  const int h1 = pad_mode == kValid ? h_in - fq + 1 : h_in;
  const int w1 = pad_mode == kValid ? w_in - fq + 1 : w_in;
  if (h1 < 1 || w1 < 1) {
    return ffi::Error::InvalidArgument("fused_cntk_pixels: the image is too small for this depth");
  }
  PixelProblem pp;
  Problem& pb = pp.pb;
  pb.g = MakeGeometry(h1, w1, static_cast<int>(q), static_cast<int>(depth), pad_mode);
  for (int l = 0; l < pb.g.depth; ++l) {
    if (pb.g.h[l] < 1 || pb.g.w[l] < 1) {
      return ffi::Error::InvalidArgument(
          "fused_cntk_pixels: the image is too small for this depth");
    }
  }
  const int pad = pad_mode == kValid ? 0 : (fq - 1) / 2;
  pp.sum_h = WindowGather(fq, pad_mode, pad, h_in, h1, false);
  pp.sum_w = WindowGather(fq, pad_mode, pad, w_in, w1, false);
  const int p0 = pb.g.positions(0);
  const auto count = [](const auto& buffer) {
    return static_cast<int64_t>(buffer.element_count());
  };
  const int64_t blocks = (x2_dims[0] + kLanes - 1) / kLanes;
  if (count(sq1) != x1_dims[0] * p0 || count(sq2) != blocks * p0 * kLanes ||
      static_cast<int64_t>(out->element_count()) != x1_dims[0] * blocks * kLanes) {
    return ffi::Error::InvalidArgument(
        "fused_cntk_pixels: sq1 must be (n1, P), sq2 (blocks, P, 16), out (n1, 16 blocks)");
  }
  if (first_row.element_count() != 1) {
    return ffi::Error::InvalidArgument("fused_cntk_pixels: first_row must be a scalar");
  }
  pb.n1 = x1_dims[0];
  pb.blocks = blocks;
  pb.d = 0;
  pb.inv_channels = inv_channels;
  pb.ntk = ntk;
  pb.p1 = nullptr;
  pb.mp2 = nullptr;
  pb.out = out->typed_data();
  pb.first_row = first_row.typed_data()[0];
  pp.pixels = x1_dims[1];
  pp.w_in = w_in;
  pp.channels = x1_dims[2];
  pp.x1 = x1.typed_data();
  pp.x2 = x2.typed_data();
  pp.n2 = x2_dims[0];
  pp.row_tile = row_tile;
  pp.group = std::min<int64_t>(group, std::max<int64_t>(pb.blocks, 1));
  const SelfTables self =
      LaneLayoutSelfTables(pb.g, pb.n1, pb.blocks, inv_channels, sq1.typed_data(),
                           sq2.typed_data());
  self.AttachTo(pb);

  // Column-block groups spread over threads; row tiles inner.
  const int64_t groups = (pb.blocks + pp.group - 1) / pp.group;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, groups));
  RunWorkers(workers, [&pp, workers, groups, h1](int64_t w) {
    const Problem& pb = pp.pb;
    Workspace ws(pb.g);
    std::vector<float> grams(static_cast<size_t>(pp.row_tile) * pp.group * pp.pixels * kLanes);
    std::vector<float> tmp(static_cast<size_t>(h1) * pp.w_in * kLanes);
    std::vector<float> cols(static_cast<size_t>(pp.group) * pp.pixels * pp.channels * kLanes);
    for (int64_t gi = w; gi < groups; gi += workers) {
      const int64_t b0 = gi * pp.group, nb = std::min(pp.group, pb.blocks - b0);
      LayOutColumns(pp, b0, nb, cols);
      for (int64_t a0 = 0; a0 < pb.n1; a0 += pp.row_tile) {
        const int64_t na = std::min(pp.row_tile, pb.n1 - a0);
        if (pb.ntk) PixelTile<true>(pp, cols, a0, na, b0, nb, grams, tmp, ws);
        else PixelTile<false>(pp, cols, a0, na, b0, nb, grams, tmp, ws);
      }
    }
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// Kernel and its gradients w.r.t. the patch Grams (the reverse pass the predictor AGOP needs).
// ------------------------------------------------------------------------------------------

// Vector helpers for the reverse pass (GCC / Clang vector extensions; AVX-512 code under
// -march=native on such CPUs).
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Splat(float x) { return Zero() + x; }
inline Vec Select(IVec m, Vec a, Vec b) {
  return reinterpret_cast<Vec>((reinterpret_cast<IVec>(a) & m) |
                               (reinterpret_cast<IVec>(b) & ~m));
}
inline Vec Min(Vec a, Vec b) { return Select(a < b, a, b); }
inline Vec Max(Vec a, Vec b) { return Select(a > b, a, b); }
inline Vec Abs(Vec a) { return reinterpret_cast<Vec>(reinterpret_cast<IVec>(a) & 0x7fffffff); }
inline IVec AllOrNone(bool b) { return IVec{} + (b ? -1 : 0); }

#if defined(__AVX512F__)
inline Vec VSqrt(Vec u) { return reinterpret_cast<Vec>(Sqrt(reinterpret_cast<__m512>(u))); }
// 1 / sqrt(u) for u > 0 (14-bit estimate and one Newton step; not finite at u = 0).
inline Vec VRsqrt(Vec u) {
  const __m512 x = reinterpret_cast<__m512>(u);
  const __m512 y0 = _mm512_rsqrt14_ps(x);
  const __m512 corr = _mm512_fnmadd_ps(_mm512_mul_ps(x, y0), y0, _mm512_set1_ps(3.0f));
  return reinterpret_cast<Vec>(_mm512_mul_ps(_mm512_mul_ps(y0, _mm512_set1_ps(0.5f)), corr));
}
#else
inline Vec VSqrt(Vec u) {
  Vec r;
  for (int k = 0; k < kLanes; ++k) r[k] = u[k] > 0.0f ? std::sqrt(u[k]) : 0.0f;
  return r;
}
inline Vec VRsqrt(Vec u) {
  Vec r;
  for (int k = 0; k < kLanes; ++k) r[k] = 1.0f / std::sqrt(u[k]);
  return r;
}
#endif

// The 16 lane sums of 16 vectors, in order: `out[j] = sum_k v[j][k]` (a transpose-and-add
// tree: 15 additions and 30 shuffles instead of 16 horizontal reductions).
__attribute__((always_inline)) inline Vec Reduce16(const Vec* v) {
  static_assert(kLanes == 16, "Reduce16 folds 16 lanes");
  Vec w[8], y[4], z[2];
  for (int j = 0; j < 8; ++j) {
    w[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * j], v[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  }
  for (int j = 0; j < 4; ++j) {
    y[j] = __builtin_shufflevector(w[2 * j], w[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * j], w[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  }
  for (int j = 0; j < 2; ++j) {
    z[j] = __builtin_shufflevector(y[2 * j], y[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(y[2 * j], y[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

// Partial derivatives of the ReLU maps for kLanes pairs at one position, as
// `fused._relu_partials`: dR/dk12 = D, dR/dk11 = sin t s2 / (2 pi s1), dD/dk12 =
// 1 / (pi s1 s2 sin t), dD/dk11 = -cos t / (2 pi k11 sin t) (and k11 <-> k22); 0 where
// singular (a zero variance, or sin t = 0), and D = 1/2 where a variance is zero. Lanes set
// in `same` have a correlation of exactly 1 (as `ReluPosition`).
struct Partials {
  Vec d, r11, r22, d11, d12, d22;
};

template <bool kB2>
inline Partials ReluPartials(Vec k, float sa, float ia, Vec sb, Vec ib, IVec same) {
  constexpr float kInv2Pi = static_cast<float>(1.0 / (2.0 * 3.14159265358979323846));
  const Vec one = Splat(1.0f);
  const Vec c = Select(same, one, Min(Max(k * (ib * ia), Splat(-1.0f)), one));
  const Vec x = Abs(c);
  const Vec rs_minus = VRsqrt(one - x), rs_plus = VRsqrt(one + x);
  const Vec s_minus = Select(one - x > Zero(), (one - x) * rs_minus, Zero());
  const Vec sn = s_minus * ((one + x) * rs_plus);          // sin t
  Vec poly = Splat(kAcos[7]);
  for (int e = 6; e >= 0; --e) poly = poly * x + kAcos[e];
  const Vec r0 = s_minus * poly;                           // arccos |c|
  const Vec ang = Select(c < Zero(), kPi - r0, r0);
  const IVec ok = (sb > Zero()) & AllOrNone(sa > 0.0f);
  const IVec smooth = ok & (sn > Zero());
  Partials o;
  o.d = Select(ok, (kPi - ang) * kInvPi, Splat(0.5f));
  // 1 / sin t = rsqrt(1 - |c|) rsqrt(1 + |c|) (no division; masked where singular).
  const Vec inv_sin = Select(smooth, rs_minus * rs_plus, Zero());
  o.r11 = Select(smooth, sn * (sb * (ia * kInv2Pi)), Zero());
  o.d12 = inv_sin * (ib * (ia * kInvPi));
  const Vec cis = c * inv_sin;
  o.d11 = cis * (-(ia * ia) * kInv2Pi);
  if (kB2) {
    o.r22 = Select(smooth, sn * (ib * (sa * kInv2Pi)), Zero());
    o.d22 = cis * (-(ib * ib) * kInv2Pi);
  }
  return o;
}

// Buffers of one reverse pass of a (row image, column block) pair block.
struct RevWorkspace {
  std::vector<float> kl, tl;  // every layer's inputs k12 and theta (offsets by layer)
  std::vector<float> r, t, tmp, adj12, adj11, adj22, ud, v, c11, c22, u;
  std::vector<size_t> off;    // layer offsets into the per-layer arrays (positions)
  RevWorkspace(const Geometry& g, int64_t self_size) : off(g.depth + 1, 0) {
    const size_t n = static_cast<size_t>(g.positions(0)) * kLanes;
    kl.resize(static_cast<size_t>(self_size) * kLanes);
    tl.resize(kl.size());
    for (auto* b : {&r, &t, &tmp, &adj12, &adj11, &adj22, &ud, &v, &c11, &c22, &u}) b->resize(n);
    for (int l = 0; l < g.depth; ++l) off[l + 1] = off[l] + g.positions(l);
  }
};

// The kernel values of one row image against kLanes column images and their gradients w.r.t.
// the layer-1 covariances, by the hand-written reverse pass of the recursion (as
// `fused.kernel_and_gram_grads_internal`). `ws.kl[0, P0 * kLanes)` must hold the layer-1
// covariances (Gram / channels); the self factors `s1`, `i1` (row) and `s2`, `i2` (column
// block) cover every layer. For every position p of layer 1, `sink(p, a12, a11, a22)` gets
// dK/dk12, dK/dk11 and (if kB2, else zeros) dK/dk22 of the kLanes pairs. Lanes set in `same`
// pair the row image with itself (see `ReluPosition`). Returns K if kValue (else the last
// layer's forward map, which only the value needs, is skipped and zeros are returned).
template <bool kNtk, bool kB2, bool kValue, class Sink>
Vec ReversePass(const Geometry& g, const float* s1, const float* i1, const float* s2,
                const float* i2, uint32_t same, RevWorkspace& ws, Sink&& sink) {
  const int depth = g.depth;
  IVec same_v;
  for (int k = 0; k < kLanes; ++k) same_v[k] = ((same >> k) & 1u) ? -1 : 0;
  const size_t* off = ws.off.data();
  Vec total = Zero();
  for (int l = 0; l < (kValue ? depth : depth - 1); ++l) {
    const int np = g.positions(l);
    const bool last = l + 1 == depth;
    const float* kl = ws.kl.data() + off[l] * kLanes;
    const float* tl = l == 0 ? kl : ws.tl.data() + off[l] * kLanes;  // theta_1 = k12_1
    for (int p = 0; p < np; ++p) {
      const size_t o = static_cast<size_t>(p) * kLanes;
      const size_t so = off[l] + p;
      const Relu out = ReluPosition<kNtk>(kl + o, tl + o, s1[so], i1[so], s2 + so * kLanes,
                                          i2 + so * kLanes, same);
      if (last) {
        total += kNtk ? out.t : out.r;
      } else {
        Store(ws.r.data() + o, out.r);
        if (kNtk) Store(ws.t.data() + o, out.t);
      }
    }
    if (!last) {
      WindowSum<kLanes>(g, l, ws.r.data(), ws.tmp.data(), ws.kl.data() + off[l + 1] * kLanes);
      if (kNtk) {
        WindowSum<kLanes>(g, l, ws.t.data(), ws.tmp.data(), ws.tl.data() + off[l + 1] * kLanes);
      }
    }
  }
  const float inv_last = 1.0f / static_cast<float>(g.positions(depth - 1));
  // Backward. u: adjoint of the layer's output (theta D + R, or R), v: of R through the next
  // layer's covariance, c11 / c22: of the self covariances (per pair).
  for (int l = depth - 1; l >= 0; --l) {
    const int np = g.positions(l);
    const bool last = l == depth - 1;
    const float* kl = ws.kl.data() + off[l] * kLanes;
    const float* tl = l == 0 ? kl : ws.tl.data() + off[l] * kLanes;
    for (int p = 0; p < np; ++p) {
      const size_t o = static_cast<size_t>(p) * kLanes;
      const size_t so = off[l] + p;
      const Partials pt = ReluPartials<kB2>(Load(kl + o), s1[so], i1[so],
                                            Load(s2 + so * kLanes), Load(i2 + so * kLanes),
                                            same_v);
      const Vec u = last ? Splat(inv_last) : (kNtk ? Load(ws.u.data() + o) : Zero());
      const Vec adj_r = last ? u : (kNtk ? Load(ws.v.data() + o) + u : Load(ws.v.data() + o));
      Vec x12 = adj_r * pt.d;
      Vec x11 = adj_r * pt.r11;
      Vec x22 = kB2 ? adj_r * pt.r22 : Zero();
      if (kNtk) {
        const Vec adj_d = u * Load(tl + o);
        x12 += adj_d * pt.d12;
        x11 += adj_d * pt.d11;
        if (kB2) x22 += adj_d * pt.d22;
        if (l == 0) x12 += u * pt.d;  // theta_1 = k12_1
        else Store(ws.ud.data() + o, u * pt.d);
      }
      if (!last) {
        x11 += Load(ws.c11.data() + o);
        if (kB2) x22 += Load(ws.c22.data() + o);
      }
      if (l == 0) {
        sink(p, x12, x11, x22);
      } else {
        Store(ws.adj12.data() + o, x12);
        Store(ws.adj11.data() + o, x11);
        if (kB2) Store(ws.adj22.data() + o, x22);
      }
    }
    if (l > 0) {
      WindowSumTranspose<kLanes>(g, l - 1, ws.adj12.data(), ws.tmp.data(), ws.v.data());
      WindowSumTranspose<kLanes>(g, l - 1, ws.adj11.data(), ws.tmp.data(), ws.c11.data());
      if (kB2) WindowSumTranspose<kLanes>(g, l - 1, ws.adj22.data(), ws.tmp.data(), ws.c22.data());
      if (kNtk) WindowSumTranspose<kLanes>(g, l - 1, ws.ud.data(), ws.tmp.data(), ws.u.data());
    }
  }
  return total * inv_last;
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

template <bool kNtk>
void PairGrads(const GradProblem& pb, int64_t a, int64_t b, RevWorkspace& ws) {
  const int p0 = pb.g.positions(0);
  const int64_t n1 = pb.n1, n2 = pb.n2;
  for (int p = 0; p < p0; ++p) {
    const float* src = pb.g12 + (static_cast<size_t>(p) * n1 + a) * n2 + b * kLanes;
    Store(ws.kl.data() + static_cast<size_t>(p) * kLanes, Load(src) * pb.inv_channels);
  }
  const float c = pb.inv_channels;
  const Vec value = ReversePass<kNtk, true, true>(
      pb.g, pb.s1 + a * pb.self_size, pb.i1 + a * pb.self_size,
      pb.s2 + b * pb.self_size * kLanes, pb.i2 + b * pb.self_size * kLanes, 0u, ws,
      [&](int p, Vec a12, Vec a11, Vec a22) {
        const size_t dst = (static_cast<size_t>(p) * n1 + a) * n2 + b * kLanes;
        Store(pb.a12 + dst, a12 * c);
        Store(pb.b1 + dst, a11 * c);
        Store(pb.b2 + dst, a22 * c);
      });
  Store(pb.value + a * n2 + b * kLanes, value);
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
  const float* g1_data = g1.typed_data();
  const float* g2_data = g2.typed_data();
  const SelfTables self = MakeSelfTables(
      pb.g, pb.n1, pb.blocks, inv_channels,
      [&](int64_t a, int p) { return g1_data[p * pb.n1 + a]; },
      [&](int64_t b, int p, int k) { return g2_data[p * pb.n2 + b * kLanes + k]; });
  self.AttachTo(pb);
  // Work items (column block, row) in column-block-major order, split into contiguous ranges.
  const int64_t items = pb.blocks * pb.n1;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, items));
  RunWorkers(workers, [&pb, items, workers](int64_t w) {
    RevWorkspace ws(pb.g, pb.self_size);
    const int64_t first = items * w / workers, end = items * (w + 1) / workers;
    for (int64_t it = first; it < end; ++it) {
      const int64_t b = it / pb.n1, a = it % pb.n1;
      if (pb.ntk) PairGrads<true>(pb, a, b, ws);
      else PairGrads<false>(pb, a, b, ws);
    }
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------------------
// Patch AGOP of the kernel predictor f_c(z) = sum_i alpha_ic K(x_i, z), fused: the reverse
// pass of every (sample, training block) pair block and its contraction with the training
// patches stay in cache; nothing pair-sized is ever written to memory.
// ------------------------------------------------------------------------------------------
//
// For sample z (a row) and training image i (a lane of a column block), the reverse pass gives
// A = dK/dgram and B = dK/dsq(z) per position p of layer 1; then (see predictor_agop.py)
//   u[p, c, :] = sum_i alpha_ic A_i[p] x_i[p, :],  coef[p, c] = sum_i alpha_ic B_i[p],
//   v[p, c, :] = u[p, c, :] + 2 coef[p, c] z[p, :],
// and the call returns every sample's `sum_{p, c} v v^T` (d x d). Per position, the lane
// products of `group` column blocks are summed before one transpose-and-add reduction over the
// lanes (`Reduce16`) adds them to the sample's record `(u[p, c, 0..d), coef[p, c])`.

struct AgopProblem {
  Geometry g;
  int64_t s, blocks, d, classes, width;  // width: record floats per position (padded)
  float inv_channels;
  const float* pz;      // (s, P0, d) sample patches
  const float* mpz;     // (s, P0, d) M times sample patches
  const float* sqz;     // (s, P0) squared M-norms of the sample patches
  const int32_t* zidx;  // (s,) index of the sample among the training images, or -1
  const float* px;      // (blocks, P0, d, kLanes) training patches
  const float* alpha;   // (blocks, classes, kLanes)
  const float* s1;      // (s, layers...) sample self factors
  const float* i1;
  const float* s2;      // (blocks, layers..., kLanes) training self factors
  const float* i2;
  int64_t self_size;
  int64_t group, row_tile;
  float* out;           // (s, d, d)
};

struct AgopWorkspace {
  RevWorkspace rev;
  std::vector<float> a, b;     // (group, P0, kLanes): dK/dgram, dK/dsq(z) of the pair blocks
  std::vector<float> rec;      // (row_tile, P0, width): u and coef of the tile's samples
  std::vector<Vec> prod;       // (width): lane products of one position
  AgopWorkspace(const AgopProblem& pb)
      : rev(pb.g, pb.self_size),
        a(static_cast<size_t>(pb.group) * pb.g.positions(0) * kLanes),
        b(a.size()),
        rec(static_cast<size_t>(pb.row_tile) * pb.g.positions(0) * pb.width),
        prod(pb.width) {}
};

// Reverse passes of sample z against column blocks b0 .. b0 + n - 1 into ws.a, ws.b.
template <bool kNtk>
void AgopReverse(const AgopProblem& pb, int64_t z, int64_t b0, int64_t n, AgopWorkspace& ws) {
  const int p0 = pb.g.positions(0);
  const int64_t d = pb.d;
  const float* mz = pb.mpz + z * p0 * d;
  const float* sq = pb.sqz + z * p0;
  for (int64_t gb = 0; gb < n; ++gb) {
    const int64_t b = b0 + gb;
    const int64_t lane = pb.zidx[z] - b * kLanes;
    const bool has_same = lane >= 0 && lane < kLanes;
    const uint32_t same = has_same ? (1u << lane) : 0u;
    const float* xb = pb.px + b * p0 * d * kLanes;
    float* k0 = ws.rev.kl.data();
    for (int p = 0; p < p0; ++p) {
      Vec gram = LaneGram(mz + static_cast<size_t>(p) * d,
                          xb + static_cast<size_t>(p) * d * kLanes, d);
      // The sample itself: exactly its squared norm, as the XLA path (`same`).
      if (has_same) gram[lane] = sq[p];
      Store(k0 + static_cast<size_t>(p) * kLanes, gram * pb.inv_channels);
    }
    float* a = ws.a.data() + gb * p0 * kLanes;
    float* bz = ws.b.data() + gb * p0 * kLanes;
    ReversePass<kNtk, false, false>(
        pb.g, pb.s1 + z * pb.self_size, pb.i1 + z * pb.self_size,
        pb.s2 + b * pb.self_size * kLanes, pb.i2 + b * pb.self_size * kLanes, same, ws.rev,
        [&](int p, Vec a12, Vec a11, Vec) {
          Store(a + static_cast<size_t>(p) * kLanes, a12 * pb.inv_channels);
          Store(bz + static_cast<size_t>(p) * kLanes, a11 * pb.inv_channels);
        });
  }
}

// Most column blocks contracted together (the `group` attribute).
constexpr int kMaxGroup = 16;

// out[j] = sum_gb ua[gb] * x[gb][j] (lane products) for j < N, accumulated in registers.
template <int N>
inline void ContractChunk(const Vec* ua, const float* const* x, int64_t n, int64_t e0,
                          Vec* out) {
  Vec acc[N];
  for (int j = 0; j < N; ++j) acc[j] = Zero();
  for (int64_t gb = 0; gb < n; ++gb) {
    const float* xg = x[gb] + e0 * kLanes;
    for (int j = 0; j < N; ++j) acc[j] += ua[gb] * Load(xg + j * kLanes);
  }
  for (int j = 0; j < N; ++j) out[j] = acc[j];
}

// Adds the contraction of ws.a, ws.b (column blocks b0 .. b0 + n - 1) to the record `rec`.
void AgopContract(const AgopProblem& pb, int64_t b0, int64_t n, AgopWorkspace& ws, float* rec) {
  const int p0 = pb.g.positions(0);
  const int64_t d = pb.d, classes = pb.classes, width = pb.width;
  Vec* prod = ws.prod.data();
  for (int64_t j = classes * (d + 1); j < width; ++j) prod[j] = Zero();
  Vec a[kMaxGroup], bz[kMaxGroup], ua[kMaxGroup];
  const float* x[kMaxGroup];
  for (int p = 0; p < p0; ++p) {
    for (int64_t gb = 0; gb < n; ++gb) {
      a[gb] = Load(ws.a.data() + (gb * p0 + p) * kLanes);
      bz[gb] = Load(ws.b.data() + (gb * p0 + p) * kLanes);
      x[gb] = pb.px + ((b0 + gb) * p0 + p) * d * kLanes;
    }
    Vec* pr = prod;
    for (int64_t c = 0; c < classes; ++c) {
      Vec coef = Zero();
      for (int64_t gb = 0; gb < n; ++gb) {
        const Vec ac = Load(pb.alpha + ((b0 + gb) * classes + c) * kLanes);
        ua[gb] = a[gb] * ac;
        coef += bz[gb] * ac;
      }
      for (int64_t e0 = 0; e0 < d; e0 += 8) {
        WithCount8(std::min<int64_t>(8, d - e0),
                   [&](auto w) { ContractChunk<decltype(w)::value>(ua, x, n, e0, pr); });
        pr += std::min<int64_t>(8, d - e0);
      }
      *pr++ = coef;
    }
    float* r = rec + static_cast<size_t>(p) * width;
    for (int64_t j = 0; j < width; j += kLanes) Store(r + j, Load(r + j) + Reduce16(prod + j));
  }
}

// out[z] = sum_{p, c} v v^T from sample z's record.
void AgopFinish(const AgopProblem& pb, int64_t z, const float* rec) {
  const int p0 = pb.g.positions(0);
  const int64_t d = pb.d, classes = pb.classes, width = pb.width;
  const int64_t dv = (d + kLanes - 1) / kLanes;  // vectors per row of the d x d sum
  std::vector<Vec> acc(d * dv, Zero()), v(dv);
  const float* zp = pb.pz + z * p0 * d;
  for (int p = 0; p < p0; ++p) {
    const float* r = rec + static_cast<size_t>(p) * width;
    for (int64_t c = 0; c < classes; ++c) {
      const float* u = r + c * (d + 1);
      const float two_coef = 2.0f * u[d];
      float* vf = reinterpret_cast<float*>(v.data());
      for (int64_t e = 0; e < d; ++e) vf[e] = u[e] + two_coef * zp[p * d + e];
      for (int64_t e = d; e < dv * kLanes; ++e) vf[e] = 0.0f;
      for (int64_t e = 0; e < d; ++e)
        for (int64_t f = 0; f < dv; ++f) acc[e * dv + f] += vf[e] * v[f];
    }
  }
  float* o = pb.out + z * d * d;
  for (int64_t e = 0; e < d; ++e) {
    const float* row = reinterpret_cast<const float*>(acc.data() + e * dv);
    std::copy(row, row + d, o + e * d);
  }
}

template <bool kNtk>
void AgopRows(const AgopProblem& pb, int64_t r0, int64_t r1, AgopWorkspace& ws) {
  const size_t rec_size = static_cast<size_t>(pb.g.positions(0)) * pb.width;
  for (int64_t t0 = r0; t0 < r1; t0 += pb.row_tile) {
    const int64_t rows = std::min(pb.row_tile, r1 - t0);
    std::fill(ws.rec.begin(), ws.rec.begin() + rows * rec_size, 0.0f);
    // Column groups outer: a group's training data is read by every sample of the tile.
    for (int64_t b0 = 0; b0 < pb.blocks; b0 += pb.group) {
      const int64_t n = std::min(pb.group, pb.blocks - b0);
      for (int64_t zr = 0; zr < rows; ++zr) {
        AgopReverse<kNtk>(pb, t0 + zr, b0, n, ws);
        AgopContract(pb, b0, n, ws, ws.rec.data() + zr * rec_size);
      }
    }
    for (int64_t zr = 0; zr < rows; ++zr) AgopFinish(pb, t0 + zr, ws.rec.data() + zr * rec_size);
  }
}

ffi::Error FusedCntkAgopImpl(ffi::Buffer<ffi::F32> pz, ffi::Buffer<ffi::F32> mpz,
                             ffi::Buffer<ffi::F32> sqz, ffi::Buffer<ffi::S32> zidx,
                             ffi::Buffer<ffi::F32> px, ffi::Buffer<ffi::F32> sqx,
                             ffi::Buffer<ffi::F32> alpha, ffi::ResultBuffer<ffi::F32> out,
                             int64_t height, int64_t width, int64_t q, int64_t depth,
                             int64_t padding, float inv_channels, bool ntk, int64_t threads,
                             int64_t group, int64_t row_tile) {
  const auto pz_dims = pz.dimensions();
  const auto px_dims = px.dimensions();
  const auto al_dims = alpha.dimensions();
  const auto count = [](const auto& buffer) { return static_cast<int64_t>(buffer.element_count()); };
  if (pz_dims.size() != 3 || px_dims.size() != 4 || al_dims.size() != 3 ||
      count(mpz) != count(pz) || px_dims[3] != kLanes || al_dims[0] != px_dims[0] ||
      al_dims[2] != kLanes || px_dims[1] != pz_dims[1] || px_dims[2] != pz_dims[2] ||
      count(sqz) != pz_dims[0] * pz_dims[1] || count(sqx) != px_dims[0] * px_dims[1] * kLanes ||
      count(zidx) != pz_dims[0]) {
    return ffi::Error::InvalidArgument(
        "fused_cntk_agop: pz, mpz (s, P, d), sqz (s, P), zidx (s,), px (blocks, P, d, 16), "
        "sqx (blocks, P, 16), alpha (blocks, classes, 16) disagree");
  }
  if (depth < 1 || q < 1 || padding < 0 || padding > 2 || group < 1 || group > kMaxGroup ||
      row_tile < 1) {
    return ffi::Error::InvalidArgument("fused_cntk_agop: bad depth, q, padding, group or tile");
  }
  AgopProblem pb;
  pb.g = MakeGeometry(static_cast<int>(height), static_cast<int>(width), static_cast<int>(q),
                      static_cast<int>(depth), static_cast<Padding>(padding));
  for (int l = 0; l < pb.g.depth; ++l) {
    if (pb.g.h[l] < 1 || pb.g.w[l] < 1) {
      return ffi::Error::InvalidArgument("fused_cntk_agop: the image is too small for this depth");
    }
  }
  const int p0 = pb.g.positions(0);
  if (pz_dims[1] != p0) {
    return ffi::Error::InvalidArgument("fused_cntk_agop: P is not height * width");
  }
  pb.s = pz_dims[0];
  pb.blocks = px_dims[0];
  pb.d = pz_dims[2];
  pb.classes = al_dims[1];
  pb.width = (pb.classes * (pb.d + 1) + kLanes - 1) / kLanes * kLanes;
  pb.inv_channels = inv_channels;
  pb.pz = pz.typed_data();
  pb.mpz = mpz.typed_data();
  pb.sqz = sqz.typed_data();
  pb.zidx = zidx.typed_data();
  pb.px = px.typed_data();
  pb.alpha = alpha.typed_data();
  pb.out = out->typed_data();
  pb.group = std::min<int64_t>(group, pb.blocks);
  pb.row_tile = row_tile;
  const SelfTables self =
      LaneLayoutSelfTables(pb.g, pb.s, pb.blocks, inv_channels, sqz.typed_data(),
                           sqx.typed_data());
  self.AttachTo(pb);
  // Samples split into contiguous ranges, one per worker: each sample's record is private to
  // its worker, and its result does not depend on the split.
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, pb.s));
  RunWorkers(workers, [&pb, workers, ntk](int64_t w) {
    AgopWorkspace ws(pb);
    const int64_t r0 = pb.s * w / workers, r1 = pb.s * (w + 1) / workers;
    if (ntk) AgopRows<true>(pb, r0, r1, ws);
    else AgopRows<false>(pb, r0, r1, ws);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// Class-weighted per-position products for the feature-space predictor AGOP
// (`predictor_agop._w_block`):
//   c[p, b * C + k, :] += sum_i a[p, b, i] alpha[t0 + i, k] t[p, t0 + i, :]
// for every position p, with `a` (P, B, I) the reverse pass's dK/dgram of B samples against
// I training images, `alpha` (n, C) all training images' coefficients, `t` (P, n, N) all
// training features, positions leading, and t0 the block's first training image. XLA's
// batched dot ran these products at 70-100 GFLOP/s on a 2-core Xeon, against 131 GFLOP/s
// for one of them alone on one core; here each position is a register-tiled GEMM whose
// weighted left operand (`a * alpha`, 6 rows at a time) is formed once per row block, in L1,
// and never as a whole array.
// ---------------------------------------------------------------------------------------

constexpr int kGemmRows = 6;   // rows of c per register tile
constexpr int kGemmVecs = 4;   // kLanes-wide column vectors per register tile

// *p in every lane (one load-port broadcast with AVX-512, not an add to zero and a shuffle).
inline Vec Broadcast(const float* p) {
#if defined(__AVX512F__)
  if constexpr (sizeof(Vec) == sizeof(__m512)) {
    return reinterpret_cast<Vec>(_mm512_set1_ps(*p));
  }
#endif
  return Zero() + *p;
}

// c[0..MR) x [0, NV kLanes) += w (I x MR, packed k-major) @ t rows (I x N, stride ldt).
template <int MR, int NV>
inline void GemmTile(const float* w, const float* t, int64_t ldt, int64_t inner, float* c,
                     int64_t ldc) {
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Load(c + r * ldc + v * kLanes);
  for (int64_t i = 0; i < inner; ++i) {
    Vec tv[NV];
    for (int v = 0; v < NV; ++v) tv[v] = Load(t + i * ldt + v * kLanes);
    for (int r = 0; r < MR; ++r) {
      const Vec wv = Broadcast(w + i * kGemmRows + r);
      for (int v = 0; v < NV; ++v) acc[r][v] += wv * tv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) Store(c + r * ldc + v * kLanes, acc[r][v]);
}

ffi::Error WeightedPositionGemmImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> alpha,
                                    ffi::Buffer<ffi::F32> t, ffi::Buffer<ffi::S32> t0_buf,
                                    ffi::Buffer<ffi::F32> c_in, ffi::ResultBuffer<ffi::F32> c,
                                    int64_t threads) {
  const auto ad = a.dimensions(), al = alpha.dimensions(), td = t.dimensions();
  const auto cd = c_in.dimensions();
  if (ad.size() != 3 || al.size() != 2 || td.size() != 3 || cd.size() != 3) {
    return ffi::Error::InvalidArgument(
        "weighted_position_gemm: a (P, B, I), alpha (n, C), t (P, n, N), c (P, B C, N)");
  }
  const int64_t positions = ad[0], samples = ad[1], inner = ad[2];
  const int64_t n = al[0], classes = al[1], n_cols = td[2];
  const int64_t t0 = t0_buf.typed_data()[0];
  if (td[0] != positions || td[1] != n || cd[0] != positions || cd[1] != samples * classes ||
      cd[2] != n_cols || n_cols % kLanes != 0 || t0 < 0 || t0 + inner > n) {
    return ffi::Error::InvalidArgument(
        "weighted_position_gemm: mismatched shapes, N not a multiple of 16, or the block "
        "[t0, t0 + I) outside the n training images");
  }
  const float* ap = a.typed_data();
  const float* alp = alpha.typed_data() + t0 * classes;
  const float* tp = t.typed_data();
  float* out = c->typed_data();
  if (out != c_in.typed_data()) {
    std::memcpy(out, c_in.typed_data(), sizeof(float) * positions * samples * classes * n_cols);
  }
  const int64_t rows = samples * classes;
  const int64_t row_blocks = (rows + kGemmRows - 1) / kGemmRows;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, positions));
  RunWorkers(workers, [&](int64_t wk) {
    // Per position: the weighted left operand of every row tile, k-major (formed once; about
    // 0.6 MB for 290 rows x 534 training images), then column panels of t packed contiguous
    // (rows 2.3 KB apart in t would touch a new page every other step), each panel swept by
    // every row tile while it sits in L2.
    std::vector<float> w(static_cast<size_t>(row_blocks) * inner * kGemmRows);
    std::vector<float> panel(static_cast<size_t>(inner) * kGemmVecs * kLanes);
    const int64_t p0 = positions * wk / workers, p1 = positions * (wk + 1) / workers;
    for (int64_t p = p0; p < p1; ++p) {
      const float* a_p = ap + p * samples * inner;
      const float* t_p = tp + (p * n + t0) * n_cols;
      float* c_p = out + p * rows * n_cols;
      for (int64_t rb = 0; rb < row_blocks; ++rb) {
        float* w_rb = w.data() + rb * inner * kGemmRows;
        for (int r = 0; r < kGemmRows; ++r) {
          const int64_t row = rb * kGemmRows + r;
          if (row >= rows) {
            for (int64_t i = 0; i < inner; ++i) w_rb[i * kGemmRows + r] = 0.0f;
            continue;
          }
          const float* a_row = a_p + (row / classes) * inner;
          const float* al_col = alp + row % classes;
          for (int64_t i = 0; i < inner; ++i) {
            w_rb[i * kGemmRows + r] = a_row[i] * al_col[i * classes];
          }
        }
      }
      for (int64_t col = 0; col < n_cols; col += kGemmVecs * kLanes) {
        const int nv = static_cast<int>(std::min<int64_t>(kGemmVecs, (n_cols - col) / kLanes));
        const int64_t width = nv * kLanes;
        for (int64_t i = 0; i < inner; ++i) {
          std::memcpy(panel.data() + i * width, t_p + i * n_cols + col, sizeof(float) * width);
        }
        for (int64_t rb = 0; rb < row_blocks; ++rb) {
          const int mr = static_cast<int>(std::min<int64_t>(kGemmRows, rows - rb * kGemmRows));
          const float* w_rb = w.data() + rb * inner * kGemmRows;
          float* c_tile = c_p + rb * kGemmRows * n_cols + col;
          WithCount8(mr, [&](auto rcount) {
            constexpr int kMr = decltype(rcount)::value;
            if constexpr (kMr <= kGemmRows) {
              WithCount8(nv, [&](auto vcount) {
                constexpr int kNv = decltype(vcount)::value;
                if constexpr (kNv <= kGemmVecs) {
                  GemmTile<kMr, kNv>(w_rb, panel.data(), width, inner, c_tile, n_cols);
                }
              });
            }
          });
        }
      }
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
                                  .Arg<ffi::Buffer<ffi::S32>>()  // first_row ()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int64_t>("height")
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("q")
                                  .Attr<int64_t>("depth")
                                  .Attr<int64_t>("padding")
                                  .Attr<float>("inv_channels")
                                  .Attr<bool>("ntk")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JconvrfmFusedCntkPixelsF32, FusedCntkPixelsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x1 (n1, H W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sq1 (n1, P)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x2 (n2, H W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sq2 (blocks, P, 16)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // first_row ()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Attr<int64_t>("height")       // of the images
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("q")
                                  .Attr<int64_t>("depth")
                                  .Attr<int64_t>("padding")
                                  .Attr<float>("inv_channels")
                                  .Attr<bool>("ntk")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("row_tile")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("first_q"));

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JconvrfmFusedCntkAgopF32, FusedCntkAgopImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pz (s, P, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mpz (s, P, d)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sqz (s, P)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // zidx (s,)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // px (blocks, P, d, 16)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sqx (blocks, P, 16)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // alpha (blocks, classes, 16)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // (s, d, d)
                                  .Attr<int64_t>("height")
                                  .Attr<int64_t>("width")
                                  .Attr<int64_t>("q")
                                  .Attr<int64_t>("depth")
                                  .Attr<int64_t>("padding")
                                  .Attr<float>("inv_channels")
                                  .Attr<bool>("ntk")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("row_tile"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JconvrfmWeightedPositionGemmF32, WeightedPositionGemmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a (P, B, I)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // alpha (n, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t (P, n, N)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // t0 ()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c (P, B C, N), aliased
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c + the products
                                  .Attr<int64_t>("threads"));
