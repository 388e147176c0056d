// CPU inference kernels of the FFF trees, registered as torch.library ops in the `fff_moe` namespace.
//
// Built on first use by fff_moe_plugin/ops/extension.py (torch.utils.cpp_extension JIT). The arithmetic is
// written with GCC/Clang vector extensions, so the same source becomes AVX-512, AVX2 or SSE code depending
// on the -m flags the build passes for this processor; tokens are spread over threads in pieces claimed from
// a shared counter inside at::parallel_for (OpenMP), which follows torch.set_num_threads.
//
// Ops (plain-torch references live beside their Python wrappers in ops/inference.py):
//   descend(x, weight, bias?, levels, strict)                -> (nodes [S,D] long, logits [S,D], end [S] long)
//   leaf_mlp(x, leaf, gate?, w1, b1?, w2, b2?, act)           -> y [S,o]   tokens grouped by leaf
//   fff_infer(x, node_w, node_b?, w1, b1?, w2, b2?, depth, act, gated) -> (y [S,o], leaf [S], logits [S,D])
//   path_neuron(x, w_in, b_in?, w_out, out_bias?, levels, act) -> (y [S,o], end [S] long)
//
// Axes: S tokens, d input width, N nodes, L leaves, l leaf width, o output width, D levels visited.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

// ---- vectors ---------------------------------------------------------------------------------------
// 64-byte vectors: one zmm register with AVX-512, two ymm with AVX2, four xmm otherwise.
template <typename T> struct VecOf;
template <> struct VecOf<float> { typedef float type __attribute__((vector_size(64))); };
template <> struct VecOf<double> { typedef double type __attribute__((vector_size(64))); };
template <typename T> using Vec = typename VecOf<T>::type;
template <typename T> constexpr int kLanes = 64 / sizeof(T);

template <typename T> inline Vec<T> vload(const T* p) { Vec<T> v; std::memcpy(&v, p, sizeof(v)); return v; }
template <typename T> inline void vstore(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof(v)); }
// a broadcast: a - 0 is a for every a (-0 included), so the compiler drops the subtraction, which it may
// not do for 0 + a
template <typename T> inline Vec<T> vsplat(T a) { return a - Vec<T>{}; }
template <typename T> inline T vsum(Vec<T> v) {  // pairwise: log2(lanes) dependent adds
  T a[kLanes<T>];
  std::memcpy(a, &v, sizeof(v));
  for (int w = kLanes<T> / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

template <typename T> inline void prefetch_row(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(T)) __builtin_prefetch(p + i, 0, 3);
}

// Dot product of two length-n rows: four vector accumulators, then a scalar tail.
template <typename T> inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int V = kLanes<T>;
  Vec<T> s0{}, s1{}, s2{}, s3{};
  int64_t i = 0;
  for (; i + 4 * V <= n; i += 4 * V) {
    s0 += vload(a + i) * vload(b + i);
    s1 += vload(a + i + V) * vload(b + i + V);
    s2 += vload(a + i + 2 * V) * vload(b + i + 2 * V);
    s3 += vload(a + i + 3 * V) * vload(b + i + 3 * V);
  }
  for (; i + V <= n; i += V) s0 += vload(a + i) * vload(b + i);
  T s = vsum<T>((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---- threads -------------------------------------------------------------------------------------------
// f(begin, end) over [0, n) in pieces of `grain` that threads claim from a shared counter as they become free,
// rather than at::parallel_for's equal split: on a machine shared with other processes, a thread that is
// descheduled then holds up at most one piece instead of half of the work.
template <typename F>
void parallel_pieces(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int threads = at::get_num_threads();
  if (n <= grain || threads == 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t slot = b; slot < e; ++slot) {
      for (int64_t s = next.fetch_add(grain); s < n; s = next.fetch_add(grain)) f(s, std::min(n, s + grain));
    }
  });
}

// ---- activations (codes shared with ops/inference.py ACTIVATION_CODES) --------------------------------
enum Act : int64_t { kIdentity = 0, kRelu = 1, kGelu = 2, kSilu = 3, kTanh = 4, kSigmoid = 5 };

// erf for float32 by a rational minimax approximation (Eigen's; max error a few ulp on [-4, 4], clamped
// outside where erf is 1 to float precision). Written as a plain loop body so that it vectorises.
inline float erf_fast(float x) {
  x = std::min(4.0f, std::max(-4.0f, x));
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}
inline float erf_t(float x) { return erf_fast(x); }
inline double erf_t(double x) { return std::erf(x); }

template <typename T> inline T act_one(T v, int64_t act) {
  switch (act) {
    case kRelu: return v > T(0) ? v : (v == v ? T(0) : v);  // NaN propagates, as torch.relu
    case kGelu: return T(0.5) * v * (T(1) + erf_t(v * T(M_SQRT1_2)));
    case kSilu: return v / (T(1) + std::exp(-v));
    case kTanh: return std::tanh(v);
    case kSigmoid: return T(1) / (T(1) + std::exp(-v));
    default: return v;
  }
}

template <typename T> void act_inplace(T* h, int64_t n, int64_t act) {
  switch (act) {
    case kIdentity: return;
    case kRelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = h[i] > T(0) ? h[i] : (h[i] == h[i] ? T(0) : h[i]);
      return;
    case kGelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = T(0.5) * h[i] * (T(1) + erf_t(h[i] * T(M_SQRT1_2)));
      return;
    default:
      for (int64_t i = 0; i < n; ++i) h[i] = act_one(h[i], act);
  }
}

// ---- blocked small matmul ------------------------------------------------------------------------------
// C[m, 0:n] = sum_k A[m][k] * B[k, 0:n] for m < M rows given by pointers (gathered tokens or a local
// buffer); B row-major with row stride ldb. Register tile: M rows x NV vectors; every output element is
// accumulated in k order whatever the tile, so a token's result does not depend on its neighbours.
template <typename T, int M, int NV>
inline void tile(const T* const* A, int64_t K, const T* B, int64_t ldb, int64_t n0, T* const* C) {
  constexpr int V = kLanes<T>;
  Vec<T> acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec<T>{};
  const T* b = B + n0;
  for (int64_t k = 0; k < K; ++k, b += ldb) {
    Vec<T> bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + v * V);
    for (int m = 0; m < M; ++m) {
      const Vec<T> a = vsplat<T>(A[m][k]);
      for (int v = 0; v < NV; ++v) acc[m][v] += a * bv[v];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) vstore(C[m] + n0 + v * V, acc[m][v]);
}

template <typename T, int M>
inline void rows_matmul_fixed(const T* const* A, int64_t K, const T* B, int64_t ldb, int64_t n, T* const* C) {
  constexpr int V = kLanes<T>;
  int64_t n0 = 0;
  if constexpr (M <= 2) {  // few rows: wider tiles stream more of each row of B per pass
    for (; n0 + 8 * V <= n; n0 += 8 * V) tile<T, M, 8>(A, K, B, ldb, n0, C);
  }
  for (; n0 + 4 * V <= n; n0 += 4 * V) tile<T, M, 4>(A, K, B, ldb, n0, C);
  for (; n0 + 2 * V <= n; n0 += 2 * V) tile<T, M, 2>(A, K, B, ldb, n0, C);
  for (; n0 + V <= n; n0 += V) tile<T, M, 1>(A, K, B, ldb, n0, C);
  if (n0 < n && n >= V) {
    // the columns left over: one more vector ending at column n, overlapping columns already done; every
    // element is the same k-ordered sum, so the overlap is rewritten with identical values
    tile<T, M, 1>(A, K, B, ldb, n - V, C);
    n0 = n;
  }
  for (; n0 < n; ++n0) {  // widths narrower than one vector
    for (int m = 0; m < M; ++m) {
      T s = 0;
      for (int64_t k = 0; k < K; ++k) s += A[m][k] * B[k * ldb + n0];
      C[m][n0] = s;
    }
  }
}

constexpr int kRows = 6;  // token rows per register tile: 6 x 4 accumulators of 64 bytes

template <typename T>
inline void rows_matmul(const T* const* A, int m, int64_t K, const T* B, int64_t ldb, int64_t n, T* const* C) {
  switch (m) {
    case 6: rows_matmul_fixed<T, 6>(A, K, B, ldb, n, C); break;
    case 5: rows_matmul_fixed<T, 5>(A, K, B, ldb, n, C); break;
    case 4: rows_matmul_fixed<T, 4>(A, K, B, ldb, n, C); break;
    case 3: rows_matmul_fixed<T, 3>(A, K, B, ldb, n, C); break;
    case 2: rows_matmul_fixed<T, 2>(A, K, B, ldb, n, C); break;
    case 1: rows_matmul_fixed<T, 1>(A, K, B, ldb, n, C); break;
    default: break;
  }
}

// One leaf's MLP for up to kRows tokens: y[t] = gate[t] * (act(x[t] W1 + b1) W2 + b2).
template <typename T>
inline void leaf_rows(const T* const* xr, T* const* yr, const T* gates, int m, int64_t d, int64_t l, int64_t o,
                      const T* w1, const T* b1, const T* w2, const T* b2, int64_t act, T* hbuf) {
  T* hr[kRows];
  for (int i = 0; i < m; ++i) hr[i] = hbuf + i * l;
  rows_matmul<T>(xr, m, d, w1, l, l, hr);  // [m, l]
  for (int i = 0; i < m; ++i) {
    if (b1) {
      for (int64_t j = 0; j < l; ++j) hr[i][j] += b1[j];
    }
    act_inplace<T>(hr[i], l, act);
  }
  if (m == 1) {
    // one token: y = sum_k h[k] * W2[k, :], streaming W2 row after row (the order memory prefers when the
    // leaf's weights come from DRAM); each element is still accumulated in k order from zero
    T* y = yr[0];
    std::fill(y, y + o, T(0));
    for (int64_t k = 0; k < l; ++k) {
      const T hk = hr[0][k];
      const T* w = w2 + k * o;
#pragma omp simd
      for (int64_t j = 0; j < o; ++j) y[j] += hk * w[j];
    }
  } else {
    rows_matmul<T>(const_cast<const T* const*>(hr), m, l, w2, o, o, yr);  // [m, o]
  }
  for (int i = 0; i < m; ++i) {
    T* y = yr[i];
    if (b2) {
      for (int64_t j = 0; j < o; ++j) y[j] += b2[j];
    }
    if (gates) {
      const T g = gates[i];
      for (int64_t j = 0; j < o; ++j) y[j] *= g;
    }
  }
}

// Tokens grouped by leaf: a counting sort, then work items of up to kChunk tokens of one leaf, spread
// over threads. Each item streams its leaf's weights once per kRows tokens.
constexpr int64_t kChunk = 96;

template <typename T>
void grouped_leaves(const T* x, int64_t S, int64_t d, const int64_t* leaf, const T* gate, int64_t L, const T* w1,
                    const T* b1, int64_t l, const T* w2, const T* b2, int64_t o, int64_t act, T* y) {
  if (S == 0) return;
  if (S <= kRows) {  // small batches: no sort, each token on its own
    std::vector<T> hbuf(l);
    for (int64_t t = 0; t < S; ++t) {
      const T* xr[1] = {x + t * d};
      T* yr[1] = {y + t * o};
      const int64_t e = leaf[t];
      T g = gate ? gate[t] : T(1);
      leaf_rows<T>(xr, yr, gate ? &g : nullptr, 1, d, l, o, w1 + e * d * l, b1 ? b1 + e * l : nullptr,
                   w2 + e * l * o, b2 ? b2 + e * o : nullptr, act, hbuf.data());
    }
    return;
  }
  std::vector<int64_t> count(L + 1, 0), order(S);
  for (int64_t t = 0; t < S; ++t) ++count[leaf[t] + 1];
  for (int64_t e = 0; e < L; ++e) count[e + 1] += count[e];
  {
    std::vector<int64_t> pos(count.begin(), count.end() - 1);
    for (int64_t t = 0; t < S; ++t) order[pos[leaf[t]]++] = t;
  }
  std::vector<int64_t> item_leaf, item_start;
  for (int64_t e = 0; e < L; ++e)
    for (int64_t s = count[e]; s < count[e + 1]; s += kChunk) {
      item_leaf.push_back(e);
      item_start.push_back(s);
    }
  const int64_t n_items = static_cast<int64_t>(item_leaf.size());
  parallel_pieces(n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> hbuf(kRows * l);
    const T* xr[kRows];
    T* yr[kRows];
    T g[kRows];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t e = item_leaf[it];
      const int64_t stop = std::min(count[e + 1], item_start[it] + kChunk);
      for (int64_t s = item_start[it]; s < stop; s += kRows) {
        const int m = static_cast<int>(std::min<int64_t>(kRows, stop - s));
        for (int i = 0; i < m; ++i) {
          const int64_t t = order[s + i];
          xr[i] = x + t * d;
          yr[i] = y + t * o;
          g[i] = gate ? gate[t] : T(1);
        }
        leaf_rows<T>(xr, yr, gate ? g : nullptr, m, d, l, o, w1 + e * d * l, b1 ? b1 + e * l : nullptr,
                     w2 + e * l * o, b2 ? b2 + e * o : nullptr, act, hbuf.data());
      }
    }
  });
}

// Dot products of m independent (a, b) row pairs at once: their loads and FMAs overlap, which hides the
// latency of a descent that cannot know its next row before the current dot product ends.
template <typename T, int M>
inline void dots_fixed(const T* const* a, const T* const* b, int64_t n, T* out) {
  constexpr int V = kLanes<T>;
  Vec<T> s0[M], s1[M];
  for (int j = 0; j < M; ++j) s0[j] = s1[j] = Vec<T>{};
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V)
    for (int j = 0; j < M; ++j) {
      s0[j] += vload(a[j] + i) * vload(b[j] + i);
      s1[j] += vload(a[j] + i + V) * vload(b[j] + i + V);
    }
  for (; i + V <= n; i += V)
    for (int j = 0; j < M; ++j) s0[j] += vload(a[j] + i) * vload(b[j] + i);
  for (int j = 0; j < M; ++j) {
    T s = vsum<T>(s0[j] + s1[j]);
    for (int64_t k = i; k < n; ++k) s += a[j][k] * b[j][k];
    out[j] = s;
  }
}

constexpr int kDescendBlock = 4;  // tokens descending side by side

template <typename T>
inline void dots(const T* const* a, const T* const* b, int m, int64_t n, T* out) {
  switch (m) {
    case 8: dots_fixed<T, 8>(a, b, n, out); break;
    case 7: dots_fixed<T, 7>(a, b, n, out); break;
    case 6: dots_fixed<T, 6>(a, b, n, out); break;
    case 5: dots_fixed<T, 5>(a, b, n, out); break;
    case 4: dots_fixed<T, 4>(a, b, n, out); break;
    case 3: dots_fixed<T, 3>(a, b, n, out); break;
    case 2: dots_fixed<T, 2>(a, b, n, out); break;
    case 1: dots_fixed<T, 1>(a, b, n, out); break;
    default: break;
  }
}

// Hard descent of m <= kDescendBlock tokens side by side, from level k0 (at nodes node[j]) to level `levels`.
// Token j's input row is xr[j]; its visited node and logit of level k go to nrow[j][k] and zrow[j][k]; node[j]
// ends on the node below the last level. When `out_rows` is given (the path-neuron output weights, row
// width o), each visited node's output row is prefetched for the output sum that follows.
template <typename T>
inline void descend_rows(const T* const* xr, int m, const T* w, const T* b, int64_t d, int64_t k0, int64_t levels,
                         bool strict, int64_t* node, int64_t* const* nrow, T* const* zrow,
                         const T* out_rows = nullptr, int64_t o = 0) {
  const T* wr[kDescendBlock];
  T z[kDescendBlock];
  for (int64_t k = k0; k < levels; ++k) {
    for (int j = 0; j < m; ++j) wr[j] = w + node[j] * d;
    dots<T>(xr, wr, m, d, z);
    for (int j = 0; j < m; ++j) {
      T zj = z[j];
      if (b) zj += b[node[j]];
      nrow[j][k] = node[j];
      zrow[j][k] = zj;
      if (out_rows) prefetch_row(out_rows + node[j] * o, o);
      node[j] = 2 * node[j] + 1 + ((strict ? zj > T(0) : zj >= T(0)) ? 1 : 0);
      if (m <= 2 && k + 1 < levels) {  // few tokens: fetch the next row early (latency, not throughput)
        prefetch_row(w + node[j] * d, d);
      }
    }
  }
}

// Tokens t0 .. t0 + m - 1 from the root; rows of `levels` entries in nodes / logits; end nodes to end[].
template <typename T>
inline void descend_block(const T* x, int64_t t0, int m, const T* w, const T* b, int64_t d, int64_t levels, bool strict,
                          int64_t* nodes, T* logits, int64_t* end, const T* out_rows = nullptr, int64_t o = 0) {
  const T* xr[kDescendBlock];
  int64_t* nrow[kDescendBlock];
  T* zrow[kDescendBlock];
  for (int j = 0; j < m; ++j) {
    end[j] = 0;
    xr[j] = x + (t0 + j) * d;
    nrow[j] = nodes + j * levels;
    zrow[j] = logits + j * levels;
  }
  descend_rows<T>(xr, m, w, b, d, 0, levels, strict, end, nrow, zrow, out_rows, o);
}

// All S tokens, in blocks spread over threads.
template <typename T>
void descend_all(const T* x, int64_t S, const T* w, const T* b, int64_t d, int64_t levels, bool strict, int64_t* nodes,
                 T* logits, int64_t* end) {
  const int64_t blocks = (S + kDescendBlock - 1) / kDescendBlock;
  parallel_pieces(blocks, 4, [&](int64_t begin, int64_t stop) {
    for (int64_t blk = begin; blk < stop; ++blk) {
      const int64_t t0 = blk * kDescendBlock;
      const int m = static_cast<int>(std::min<int64_t>(kDescendBlock, S - t0));
      descend_block<T>(x, t0, m, w, b, d, levels, strict, nodes + t0 * levels, logits + t0 * levels, end + t0);
    }
  });
}

// ---- argument checks (ValueError in Python) ------------------------------------------------------------
void check_float(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(),
                    " but x has ", x.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be [S, d], got ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "the fff_moe kernels take float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor");
}

void check_act(int64_t act) {
  TORCH_CHECK_VALUE(act >= kIdentity && act <= kSigmoid, "activation code ", act, " unknown (allowed 0..5)");
}

void check_bias(const c10::optional<at::Tensor>& b, const char* name, at::IntArrayRef shape, const at::Tensor& x) {
  if (!b.has_value()) return;
  check_float(*b, name, x);
  TORCH_CHECK_VALUE(b->sizes() == shape, name, " must have shape ", shape, ", got ", b->sizes());
}

template <typename T> const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

c10::optional<at::Tensor> contig(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return t->contiguous();
}

// ---- ops -----------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> descend_op(const at::Tensor& x_, const at::Tensor& weight_,
                                                          const c10::optional<at::Tensor>& bias_,
                                                          int64_t levels, bool strict) {
  check_x(x_);
  check_float(weight_, "weight", x_);
  TORCH_CHECK_VALUE(levels >= 0 && levels <= 62, "levels must be in [0, 62], got ", levels);
  const int64_t S = x_.size(0), d = x_.size(1);
  const int64_t needed = levels == 0 ? 0 : (int64_t(1) << levels) - 1;
  TORCH_CHECK_VALUE(weight_.dim() == 2 && weight_.size(1) == d && weight_.size(0) >= needed,
                    "weight must be [N >= ", needed, ", ", d, "] for ", levels, " levels, got ", weight_.sizes());
  check_bias(bias_, "bias", {weight_.size(0)}, x_);
  auto x = x_.contiguous();
  auto weight = weight_.contiguous();
  auto bias = contig(bias_);
  auto nodes = at::empty({S, levels}, x.options().dtype(at::kLong));
  auto logits = at::empty({S, levels}, x.options());
  auto end = at::empty({S}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fff_moe::descend", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = ptr_or_null<scalar_t>(bias);
    int64_t* np = nodes.data_ptr<int64_t>();
    scalar_t* lp = logits.data_ptr<scalar_t>();
    int64_t* ep = end.data_ptr<int64_t>();
    descend_all<scalar_t>(xp, S, wp, bp, d, levels, strict, np, lp, ep);
  });
  return {nodes, logits, end};
}

void check_leaves(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                  const at::Tensor& w2, const c10::optional<at::Tensor>& b2) {
  const int64_t d = x.size(1);
  check_float(w1, "w1", x);
  check_float(w2, "w2", x);
  TORCH_CHECK_VALUE(w1.dim() == 3 && w1.size(1) == d, "x is ", x.sizes(), " but w1 is ", w1.sizes(),
                    ": w1 must be [L, d, l] with the width d of x");
  TORCH_CHECK_VALUE(w2.dim() == 3 && w2.size(0) == w1.size(0) && w2.size(1) == w1.size(2),
                    "w2 must be [", w1.size(0), ", ", w1.size(2), ", o], got ", w2.sizes());
  check_bias(b1, "b1", {w1.size(0), w1.size(2)}, x);
  check_bias(b2, "b2", {w2.size(0), w2.size(2)}, x);
}

at::Tensor leaf_mlp_op(const at::Tensor& x_, const at::Tensor& leaf_, const c10::optional<at::Tensor>& gate_,
                       const at::Tensor& w1_, const c10::optional<at::Tensor>& b1_, const at::Tensor& w2_,
                       const c10::optional<at::Tensor>& b2_, int64_t act) {
  check_x(x_);
  check_act(act);
  check_leaves(x_, w1_, b1_, w2_, b2_);
  const int64_t S = x_.size(0), d = x_.size(1), L = w1_.size(0), l = w1_.size(2), o = w2_.size(2);
  TORCH_CHECK_VALUE(leaf_.dim() == 1 && leaf_.size(0) == S && leaf_.scalar_type() == at::kLong,
                    "leaf must be int64 [", S, "], got ", leaf_.scalar_type(), " ", leaf_.sizes());
  if (gate_.has_value()) {
    check_float(*gate_, "gate", x_);
    TORCH_CHECK_VALUE(gate_->dim() == 1 && gate_->size(0) == S, "gate must be [", S, "], got ", gate_->sizes());
  }
  auto leaf = leaf_.contiguous();
  {
    const int64_t* lp = leaf.data_ptr<int64_t>();
    for (int64_t t = 0; t < S; ++t)
      TORCH_CHECK_VALUE(lp[t] >= 0 && lp[t] < L, "leaf indices must lie in [0, ", L, "), got ", lp[t], " at ", t);
  }
  auto x = x_.contiguous();
  auto w1 = w1_.contiguous();
  auto w2 = w2_.contiguous();
  auto b1 = contig(b1_), b2 = contig(b2_), gate = contig(gate_);
  auto y = at::empty({S, o}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fff_moe::leaf_mlp", [&] {
    grouped_leaves<scalar_t>(x.data_ptr<scalar_t>(), S, d, leaf.data_ptr<int64_t>(), ptr_or_null<scalar_t>(gate), L,
                             w1.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b1), l, w2.data_ptr<scalar_t>(),
                             ptr_or_null<scalar_t>(b2), o, act, y.data_ptr<scalar_t>());
  });
  return y;
}

// Path probability of the chosen leaf: prod sigmoid(|z|) = exp(sum logsigmoid(|z|)).
template <typename T> inline T path_prob(const T* z, int64_t D) {
  T s = 0;
  for (int64_t k = 0; k < D; ++k) s -= std::log1p(std::exp(-std::abs(z[k])));
  return std::exp(s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fff_infer_op(
    const at::Tensor& x_, const at::Tensor& node_w_, const c10::optional<at::Tensor>& node_b_, const at::Tensor& w1_,
    const c10::optional<at::Tensor>& b1_, const at::Tensor& w2_, const c10::optional<at::Tensor>& b2_, int64_t depth,
    int64_t act, bool gated) {
  check_x(x_);
  check_act(act);
  check_leaves(x_, w1_, b1_, w2_, b2_);
  TORCH_CHECK_VALUE(depth >= 0 && depth <= 62, "depth must be in [0, 62], got ", depth);
  const int64_t S = x_.size(0), d = x_.size(1), L = w1_.size(0), l = w1_.size(2), o = w2_.size(2);
  const int64_t N = (int64_t(1) << depth) - 1;
  TORCH_CHECK_VALUE(L == (int64_t(1) << depth), "depth ", depth, " needs ", int64_t(1) << depth, " leaves, w1 has ", L);
  check_float(node_w_, "node_w", x_);
  TORCH_CHECK_VALUE(node_w_.dim() == 2 && node_w_.size(0) == N && node_w_.size(1) == d, "x is ", x_.sizes(),
                    ": node_w must be [", N, ", ", d, "] for depth ", depth, ", got ", node_w_.sizes());
  check_bias(node_b_, "node_b", {N}, x_);
  auto x = x_.contiguous();
  auto node_w = node_w_.contiguous();
  auto node_b = contig(node_b_), b1 = contig(b1_), b2 = contig(b2_);
  auto w1 = w1_.contiguous();
  auto w2 = w2_.contiguous();
  auto y = at::empty({S, o}, x.options());
  auto leaf = at::empty({S}, x.options().dtype(at::kLong));
  auto logits = at::empty({S, depth}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fff_moe::fff_infer", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = node_w.data_ptr<scalar_t>();
    const scalar_t* bp = ptr_or_null<scalar_t>(node_b);
    int64_t* leafp = leaf.data_ptr<int64_t>();
    scalar_t* zp = logits.data_ptr<scalar_t>();
    std::vector<scalar_t> gate(gated ? S : 0);
    std::vector<int64_t> nodes(S * depth);
    descend_all<scalar_t>(xp, S, wp, bp, d, depth, false, nodes.data(), zp, leafp);
    for (int64_t t = 0; t < S; ++t) {
      leafp[t] -= N;
      if (gated) gate[t] = path_prob<scalar_t>(zp + t * depth, depth);
    }
    grouped_leaves<scalar_t>(xp, S, d, leafp, gated ? gate.data() : nullptr, L, w1.data_ptr<scalar_t>(),
                             ptr_or_null<scalar_t>(b1), l, w2.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b2), o, act,
                             y.data_ptr<scalar_t>());
  });
  return {y, leaf, logits};
}

// Path-neuron tree: at each visited neuron a = w_in . x + b, y += act(a) * w_out[n], n -> 2n + 1 + [a > 0].
// y = sum over the visited levels k of a[k] * w_out[nodes[k]] (+ out_bias), 4 vectors of outputs at a time
// kept in registers.
template <typename T, int NV>
inline void path_output_chunk(const int64_t* nj, const T* aj, int64_t levels, const T* w_out, const T* out_bias,
                              int64_t o, int64_t c, T* yt) {
  constexpr int V = kLanes<T>;
  Vec<T> acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = out_bias ? vload(out_bias + c + v * V) : Vec<T>{};
  for (int64_t k = 0; k < levels; ++k) {
    const T* u = w_out + nj[k] * o + c;
    const Vec<T> ak = vsplat<T>(aj[k]);
    for (int v = 0; v < NV; ++v) acc[v] += ak * vload(u + v * V);
  }
  for (int v = 0; v < NV; ++v) vstore(yt + c + v * V, acc[v]);
}

// y = out_bias + sum over the visited levels k of a[k] * w_out[nodes[k]]: 8 vectors of outputs at a time
// in registers, 8 independent FMA chains.
template <typename T>
inline void path_output(const int64_t* nj, const T* aj, int64_t levels, const T* w_out, const T* out_bias, int64_t o,
                        T* yt) {
  constexpr int V = kLanes<T>;
  int64_t c = 0;
  for (; c + 8 * V <= o; c += 8 * V) path_output_chunk<T, 8>(nj, aj, levels, w_out, out_bias, o, c, yt);
  for (; c + V <= o; c += V) path_output_chunk<T, 1>(nj, aj, levels, w_out, out_bias, o, c, yt);
  for (; c < o; ++c) {
    T s = out_bias ? out_bias[c] : T(0);
    for (int64_t k = 0; k < levels; ++k) s += aj[k] * w_out[nj[k] * o + c];
    yt[c] = s;
  }
}

// The outputs of 4 tokens that follow one another in path order: on the levels where all 4 visited the same
// neuron, its output row is loaded once for the 4 (half the loads per FMA of one token at a time). Every
// element is the same sum in the same order as path_output's, so the result does not depend on the grouping.
constexpr int kOutTokens = 4;

template <typename T>
inline void path_output_4(const int64_t* const* nj, const T* const* aj, int64_t levels, const T* w_out,
                          const T* out_bias, int64_t o, T* const* yt) {
  constexpr int V = kLanes<T>;
  constexpr int J = kOutTokens;
  bool shared[64];
  for (int64_t k = 0; k < levels; ++k) {
    shared[k] = true;
    for (int j = 1; j < J; ++j) shared[k] = shared[k] && nj[j][k] == nj[0][k];
  }
  int64_t c = 0;
  for (; c + 4 * V <= o; c += 4 * V) {
    Vec<T> acc[J][4];
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < 4; ++v) acc[j][v] = out_bias ? vload(out_bias + c + v * V) : Vec<T>{};
    for (int64_t k = 0; k < levels; ++k) {
      if (shared[k]) {
        const T* u = w_out + nj[0][k] * o + c;
        Vec<T> uv[4];
        for (int v = 0; v < 4; ++v) uv[v] = vload(u + v * V);
        for (int j = 0; j < J; ++j) {
          const Vec<T> a = vsplat<T>(aj[j][k]);
          for (int v = 0; v < 4; ++v) acc[j][v] += a * uv[v];
        }
      } else {
        for (int j = 0; j < J; ++j) {
          const T* u = w_out + nj[j][k] * o + c;
          const Vec<T> a = vsplat<T>(aj[j][k]);
          for (int v = 0; v < 4; ++v) acc[j][v] += a * vload(u + v * V);
        }
      }
    }
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < 4; ++v) vstore(yt[j] + c + v * V, acc[j][v]);
  }
  if (c < o) {  // the columns left over, one token at a time in the same order
    for (int j = 0; j < J; ++j)
      for (int64_t cc = c; cc < o; ++cc) {
        T sum = out_bias ? out_bias[cc] : T(0);
        for (int64_t k = 0; k < levels; ++k) sum += aj[j][k] * w_out[nj[j][k] * o + cc];
        yt[j][cc] = sum;
      }
  }
}

// Levels descended for all tokens before they are regrouped by subtree: 2**8 - 1 = 255 top neurons stay in
// the L2 cache, and each level-8 subtree (15 neurons per 4 further levels) is then reused by its tokens.
constexpr int64_t kTopLevels = 8;
constexpr int64_t kRegroupMin = 256;  // tokens from which regrouping pays for its sort

template <typename T>
void path_neuron_rows(const T* x, int64_t S, int64_t d, const T* w_in, const T* b_in, const T* w_out,
                      const T* out_bias, int64_t o, int64_t levels, int64_t act, T* y, int64_t* end) {
  std::vector<int64_t> nodes(S * levels);
  std::vector<T> a(S * levels);
  std::vector<int64_t> order(S), cur(S);
  const bool regroup = S >= kRegroupMin && levels > kTopLevels;
  const int64_t top = regroup ? kTopLevels : levels;
  const int64_t blocks = (S + kDescendBlock - 1) / kDescendBlock;
  // phase 1: every token through the top levels, in input order
  parallel_pieces(blocks, 4, [&](int64_t begin, int64_t stop) {
    for (int64_t blk = begin; blk < stop; ++blk) {
      const int64_t t0 = blk * kDescendBlock;
      const int m = static_cast<int>(std::min<int64_t>(kDescendBlock, S - t0));
      const T* xr[kDescendBlock];
      int64_t* nrow[kDescendBlock];
      T* zrow[kDescendBlock];
      for (int j = 0; j < m; ++j) {
        cur[t0 + j] = 0;
        xr[j] = x + (t0 + j) * d;
        nrow[j] = nodes.data() + (t0 + j) * levels;
        zrow[j] = a.data() + (t0 + j) * levels;
      }
      descend_rows<T>(xr, m, w_in, b_in, d, 0, top, true, cur.data() + t0, nrow, zrow, regroup ? nullptr : w_out, o);
    }
  });
  if (regroup) {  // counting sort by the subtree (node on level `top`) each token continues in
    const int64_t first = (int64_t(1) << top) - 1, buckets = int64_t(1) << top;
    std::vector<int64_t> pos(buckets + 1, 0);
    for (int64_t t = 0; t < S; ++t) ++pos[cur[t] - first + 1];
    for (int64_t i = 0; i < buckets; ++i) pos[i + 1] += pos[i];
    for (int64_t t = 0; t < S; ++t) order[pos[cur[t] - first]++] = t;
  } else {
    for (int64_t t = 0; t < S; ++t) order[t] = t;
  }
  // phase 2: the remaining levels and the output sum, tokens of one subtree side by side
  parallel_pieces(blocks, 4, [&](int64_t begin, int64_t stop) {
    for (int64_t blk = begin; blk < stop; ++blk) {
      const int64_t s0 = blk * kDescendBlock;
      const int m = static_cast<int>(std::min<int64_t>(kDescendBlock, S - s0));
      const T* xr[kDescendBlock];
      int64_t* nrow[kDescendBlock];
      T* zrow[kDescendBlock];
      int64_t node[kDescendBlock];
      for (int j = 0; j < m; ++j) {
        const int64_t t = order[s0 + j];
        node[j] = cur[t];
        xr[j] = x + t * d;
        nrow[j] = nodes.data() + t * levels;
        zrow[j] = a.data() + t * levels;
      }
      if (top < levels) descend_rows<T>(xr, m, w_in, b_in, d, top, levels, true, node, nrow, zrow,
                                        regroup ? nullptr : w_out, o);
      for (int j = 0; j < m; ++j) {
        const int64_t t = order[s0 + j];
        T* aj = zrow[j];
        for (int64_t k = 0; k < levels; ++k) aj[k] = act_one<T>(aj[k], act);
        end[t] = nrow[j][levels - 1];  // the last neuron visited
        if (!regroup) path_output<T>(nrow[j], aj, levels, w_out, out_bias, o, y + t * o);
      }
    }
  });
  if (!regroup) return;
  // phase 3: the output sums in path order (a counting sort by the last neuron), 4 tokens at a time
  {
    const int64_t first = (int64_t(1) << (levels - 1)) - 1, buckets = int64_t(1) << (levels - 1);
    std::vector<int64_t> pos(buckets + 1, 0);
    for (int64_t t = 0; t < S; ++t) ++pos[end[t] - first + 1];
    for (int64_t i = 0; i < buckets; ++i) pos[i + 1] += pos[i];
    for (int64_t t = 0; t < S; ++t) order[pos[end[t] - first]++] = t;
  }
  const int64_t groups = (S + kOutTokens - 1) / kOutTokens;
  parallel_pieces(groups, 8, [&](int64_t begin, int64_t stop) {
    for (int64_t g = begin; g < stop; ++g) {
      const int64_t s0 = g * kOutTokens;
      const int m = static_cast<int>(std::min<int64_t>(kOutTokens, S - s0));
      if (m < kOutTokens) {
        for (int j = 0; j < m; ++j) {
          const int64_t t = order[s0 + j];
          path_output<T>(nodes.data() + t * levels, a.data() + t * levels, levels, w_out, out_bias, o, y + t * o);
        }
        continue;
      }
      const int64_t* nj[kOutTokens];
      const T* aj[kOutTokens];
      T* yt[kOutTokens];
      for (int j = 0; j < kOutTokens; ++j) {
        const int64_t t = order[s0 + j];
        nj[j] = nodes.data() + t * levels;
        aj[j] = a.data() + t * levels;
        yt[j] = y + t * o;
      }
      path_output_4<T>(nj, aj, levels, w_out, out_bias, o, yt);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> path_neuron_op(const at::Tensor& x_, const at::Tensor& w_in_,
                                                  const c10::optional<at::Tensor>& b_in_, const at::Tensor& w_out_,
                                                  const c10::optional<at::Tensor>& out_bias_, int64_t levels,
                                                  int64_t act) {
  check_x(x_);
  check_act(act);
  TORCH_CHECK_VALUE(levels >= 1 && levels <= 62, "levels must be in [1, 62], got ", levels);
  const int64_t S = x_.size(0), d = x_.size(1);
  const int64_t N = (int64_t(1) << levels) - 1;
  check_float(w_in_, "w_in", x_);
  check_float(w_out_, "w_out", x_);
  TORCH_CHECK_VALUE(w_in_.dim() == 2 && w_in_.size(0) == N && w_in_.size(1) == d,
                    "w_in must be [", N, ", ", d, "], got ", w_in_.sizes());
  TORCH_CHECK_VALUE(w_out_.dim() == 2 && w_out_.size(0) == N, "w_out must be [", N, ", o], got ", w_out_.sizes());
  const int64_t o = w_out_.size(1);
  check_bias(b_in_, "b_in", {N}, x_);
  check_bias(out_bias_, "out_bias", {o}, x_);
  auto x = x_.contiguous();
  auto w_in = w_in_.contiguous();
  auto w_out = w_out_.contiguous();
  auto b_in = contig(b_in_), out_bias = contig(out_bias_);
  auto y = at::empty({S, o}, x.options());
  auto end = at::empty({S}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fff_moe::path_neuron", [&] {
    path_neuron_rows<scalar_t>(x.data_ptr<scalar_t>(), S, d, w_in.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b_in),
                               w_out.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(out_bias), o, levels, act,
                               y.data_ptr<scalar_t>(), end.data_ptr<int64_t>());
  });
  return {y, end};
}

}  // namespace

TORCH_LIBRARY(fff_moe, m) {
  m.def("descend(Tensor x, Tensor weight, Tensor? bias, int levels, bool strict) -> (Tensor, Tensor, Tensor)");
  m.def("leaf_mlp(Tensor x, Tensor leaf, Tensor? gate, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int act) -> Tensor");
  m.def("fff_infer(Tensor x, Tensor node_w, Tensor? node_b, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int depth, "
        "int act, bool gated) -> (Tensor, Tensor, Tensor)");
  m.def("path_neuron(Tensor x, Tensor w_in, Tensor? b_in, Tensor w_out, Tensor? out_bias, int levels, int act) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fff_moe, CPU, m) {
  m.impl("descend", &descend_op);
  m.impl("leaf_mlp", &leaf_mlp_op);
  m.impl("fff_infer", &fff_infer_op);
  m.impl("path_neuron", &path_neuron_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fff_moe CPU inference kernels; the ops are registered under torch.ops.fff_moe";
  // The same functions without the dispatcher, whose boxed call from Python costs several microseconds:
  // the eager path of ops/inference.py calls these, torch.compile traces the torch.ops.fff_moe ops.
  module.def("descend", &descend_op);
  module.def("leaf_mlp", &leaf_mlp_op);
  module.def("fff_infer", &fff_infer_op);
  module.def("path_neuron", &path_neuron_op);
  module.def("simd_width_bytes", [] {
#if defined(__AVX512F__)
    return 64;
#elif defined(__AVX2__)
    return 32;
#else
    return 16;
#endif
  });
}
