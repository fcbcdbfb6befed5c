// Native CPU kernels for a local training step, each fused so that its element-wise work makes
// one pass over memory; the backward's large matrix products stay ATen's (MKL):
//   * the projected LSTM, forwards and backwards: the LSTM of Hochreiter & Schmidhuber 1997 with
//     nn.LSTM's projection, backpropagation through time (Werbos 1990), its input products and
//     its batch-row recurrent products by a small packed-panel kernel (Goto & van de Geijn 2008);
//   * the tied output layer: its logits (the packed-panel kernel, words x tokens, vocabulary
//     chunk by chunk in L2), an online softmax (Milakov & Gimelshein 2018) and the cross-entropy
//     gradient (softmax - onehot) / N (Bishop 2006, "Pattern Recognition and Machine Learning",
//     sec. 4.3.4);
//   * the subword composition of the word table (mean of a word's pieces, Bojanowski et al.
//     2017) and its backward;
//   * gradient clipping by global norm with the SGD step.
// Built for AVX-512 or AVX2 (models/native.py passes the flags; the code below picks by
// __AVX512F__), with OpenMP: at::parallel_for splits the work over torch's threads, each output
// computed in a fixed order, so the results do not depend on the thread count (a test holds
// them equal on 1 and 2).  Loaded (compiled on first use) by models/native.py; models/fused.py runs its
// PyTorch version of each where they are not loaded.
#include <torch/extension.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>
#include <vector>
#include <utility>

using Vec = at::vec::Vectorized<float>;

// Every entry point checks what it will index, so a bad call is an error, never a bad read.
static void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

static void check_i64(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kLong && t.is_contiguous() && t.dim() == 1, name,
              " must be a contiguous int64 CPU vector");
}

// Every value of the int64 vector `ids` lies in [0, n): rows it may index.  (Plain loops: these
// run on every call, and ATen's aminmax / diff / all cost more in dispatch than in work.)
static void check_range(const torch::Tensor& ids, int64_t n, const char* what) {
  const int64_t* v = ids.data_ptr<int64_t>();
  bool bad = false;
  for (int64_t i = 0; i < ids.size(0); ++i) bad |= static_cast<uint64_t>(v[i]) >= static_cast<uint64_t>(n);
  TORCH_CHECK(!bad, what);
}

// The int64 vector `v` starts at 0 and never decreases (strictly: rises at every step).
static bool rises_from_zero(const torch::Tensor& v, bool strictly) {
  const int64_t* x = v.data_ptr<int64_t>();
  if (v.size(0) == 0 || x[0] != 0) return v.size(0) == 0;
  bool ok = true;
  for (int64_t i = 1; i < v.size(0); ++i) ok &= strictly ? x[i] > x[i - 1] : x[i] >= x[i - 1];
  return ok;
}

// The cell's activations from ATen's fast polynomial exp (exp_u20, a few ulp on the cell's
// inputs; the softmax uses it too): sigmoid(x) = 1 / (1 + e^-x), tanh(x) = 2 sigmoid(2x) - 1.
// Sleef's exp and tanh (what Vec::exp and Vec::tanh call) cost several times more, and a step
// evaluates five of them on every cell of every time step.
static inline Vec sigmoid(Vec x) { return Vec(1.0f) / (Vec(1.0f) + x.neg().exp_u20()); }
static inline Vec tanh_(Vec x) { return Vec(2.0f) / (Vec(1.0f) + (x * Vec(-2.0f)).exp_u20()) - Vec(1.0f); }

// One time step of the cell, batch row by batch row: a (B, 4H) gate pre-activations [i f g o]
// (without their biases, `bias` (4H)) become their activations in place; c = f * c_prev + i * g,
// tc = tanh(c), hf = o * tc.  (The last vector of a row is a partial one: masked loads and stores.)
static void cell_forward(float* a, const float* bias, const float* c_prev, float* c, float* tc, float* hf, int64_t B, int64_t H) {
  constexpr int64_t n = Vec::size();
  const float *bi = bias, *bf = bias + H, *bg = bias + 2 * H, *bo = bias + 3 * H;
  for (int64_t b = 0; b < B; ++b) {
    float *ai = a + b * 4 * H, *af = ai + H, *ag = ai + 2 * H, *ao = ai + 3 * H;
    const float* cp = c_prev + b * H;
    float *cb = c + b * H, *tb = tc + b * H, *hb = hf + b * H;
    for (int64_t j = 0; j < H; j += n) {
      const int64_t m = std::min(n, H - j);
      Vec i = sigmoid(Vec::loadu(ai + j, m) + Vec::loadu(bi + j, m)), f = sigmoid(Vec::loadu(af + j, m) + Vec::loadu(bf + j, m));
      Vec g = tanh_(Vec::loadu(ag + j, m) + Vec::loadu(bg + j, m)), o = sigmoid(Vec::loadu(ao + j, m) + Vec::loadu(bo + j, m));
      i.store(ai + j, m), f.store(af + j, m), g.store(ag + j, m), o.store(ao + j, m);
      Vec cc = f * Vec::loadu(cp + j, m) + i * g, t = tanh_(cc);
      cc.store(cb + j, m), t.store(tb + j, m), (o * t).store(hb + j, m);
    }
  }
}

// One time step backwards: from the gradient at hf (dhf) and the running gradient at c (dc,
// updated in place to the gradient at c_prev), the gradient at the gate pre-activations.
static void cell_backward(const float* a, const float* c_prev, const float* tc, const float* dhf, float* dc, float* dg,
                          int64_t B, int64_t H) {
  constexpr int64_t n = Vec::size();
  const Vec one(1.0f);
  for (int64_t b = 0; b < B; ++b) {
    const float *ai = a + b * 4 * H, *af = ai + H, *ag = ai + 2 * H, *ao = ai + 3 * H;
    const float *cp = c_prev + b * H, *tb = tc + b * H, *hb = dhf + b * H;
    float *db = dc + b * H, *di = dg + b * 4 * H, *df = di + H, *dgg = di + 2 * H, *dout = di + 3 * H;
    for (int64_t j = 0; j < H; j += n) {
      const int64_t m = std::min(n, H - j);
      Vec i = Vec::loadu(ai + j, m), f = Vec::loadu(af + j, m), g = Vec::loadu(ag + j, m), o = Vec::loadu(ao + j, m);
      Vec t = Vec::loadu(tb + j, m), dh = Vec::loadu(hb + j, m);
      Vec d = Vec::loadu(db + j, m) + dh * o * (one - t * t);
      (d * g * i * (one - i)).store(di + j, m);
      (d * Vec::loadu(cp + j, m) * f * (one - f)).store(df + j, m);
      (d * i * (one - g * g)).store(dgg + j, m);
      (dh * t * o * (one - o)).store(dout + j, m);
      (d * f).store(db + j, m);
    }
  }
}

// The recurrence's products have as many rows as the batch (8): BLAS kernels are built for large
// matrices and run these at about half their speed.  Here the weight, fixed for the whole time
// loop, is packed once into panels of kPanel columns (K x kPanel floats each, read from cache),
// and a register-blocked kernel (up to kRows rows x kPanel columns of accumulators, the
// micro-kernel design of Goto & van de Geijn 2008, "Anatomy of High-Performance Matrix
// Multiplication") multiplies a few rows by one panel at a time.  Its registers are the widest
// the build has: AVX-512 (16 floats; 8 rows x 32 columns, 16 accumulators) where torch runs
// AVX-512, else AVX2 (8 floats; 4 rows x 16 columns, 8 accumulators); enough independent
// accumulators to hide the FMA's latency on both ports, few enough to stay in registers.
#if defined(__AVX512F__)
using Reg = __m512;
constexpr int64_t kLanes = 16;
constexpr int kRows = 8;
static inline Reg reg_zero() { return _mm512_setzero_ps(); }
static inline Reg reg_load(const float* p) { return _mm512_load_ps(p); }  // 64-byte aligned
static inline Reg reg_loadu(const float* p) { return _mm512_loadu_ps(p); }
static inline void reg_storeu(float* p, Reg x) { _mm512_storeu_ps(p, x); }
static inline Reg reg_bcast(const float* p) { return _mm512_set1_ps(*p); }
static inline Reg reg_fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
static inline Reg reg_add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
static inline Reg reg_max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
#else
using Reg = __m256;
constexpr int64_t kLanes = 8;
constexpr int kRows = 4;
static inline Reg reg_zero() { return _mm256_setzero_ps(); }
static inline Reg reg_load(const float* p) { return _mm256_load_ps(p); }  // 32-byte aligned
static inline Reg reg_loadu(const float* p) { return _mm256_loadu_ps(p); }
static inline void reg_storeu(float* p, Reg x) { _mm256_storeu_ps(p, x); }
static inline Reg reg_bcast(const float* p) { return _mm256_broadcast_ss(p); }
static inline Reg reg_fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
static inline Reg reg_add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
static inline Reg reg_max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
#endif
constexpr int64_t kPanel = 2 * kLanes;  // columns a panel

struct Packed {
  torch::Tensor panels;  // (ceil(N / kPanel), K, kPanel), zero-padded past column N
  int64_t K, N;
};

// Rows r[0..7] (8 floats each) become columns: r[k] = (r_0[k], ..., r_7[k]).
static inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0)), u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0)), u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20), r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
}

// B (K x N) = w^T for w (N, K) when `transposed`, else w itself (K, N); both row-major.
static Packed pack_panels(const torch::Tensor& w, bool transposed) {
  const int64_t K = transposed ? w.size(1) : w.size(0), N = transposed ? w.size(0) : w.size(1);
  const int64_t P = (N + kPanel - 1) / kPanel;
  auto panels = torch::empty({P, K, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  float* out = panels.data_ptr<float>();
  at::parallel_for(0, P, 1024 / kPanel, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, nn = std::min<int64_t>(kPanel, N - n0);
      float* panel = out + p * K * kPanel;
      if (nn < kPanel) std::fill(panel, panel + K * kPanel, 0.0f);  // the last panel's missing columns stay zero
      if (!transposed) {
        for (int64_t k = 0; k < K; ++k) std::copy(src + k * N + n0, src + k * N + n0 + nn, panel + k * kPanel);
        continue;
      }
      int64_t k0 = 0;
      if (nn == kPanel)  // column n of B is row n of w: 8 x 8 blocks transposed in registers
        for (; k0 + 8 <= K; k0 += 8)
          for (int64_t j0 = 0; j0 < kPanel; j0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (n0 + j0 + i) * K + k0);
            transpose8(r);
            for (int i = 0; i < 8; ++i) _mm256_store_ps(panel + (k0 + i) * kPanel + j0, r[i]);
          }
      for (int64_t j = 0; j < nn; ++j)
        for (int64_t k = k0; k < K; ++k) panel[k * kPanel + j] = src[(n0 + j) * K + k];
    }
  });
  return {panels, K, N};
}

// R rows (1..kRows) of A by one packed panel: C[r, 0:nn] (+)= sum_k A[r, k] B[k, panel columns].
// kBias (the output layer's logits): row r also gets bias[r], and mx[0..1] the running column max.
template <int R, bool kBias = false>
static void panel_kernel(const float* a, int64_t lda, const float* bp, int64_t K, float* c, int64_t ldc, int64_t nn,
                         bool accumulate, const float* bias = nullptr, Reg* mx = nullptr) {
  Reg acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = reg_zero();
  for (int64_t k = 0; k < K; ++k) {
    const Reg b0 = reg_load(bp + k * kPanel), b1 = reg_load(bp + k * kPanel + kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Reg x = reg_bcast(a + r * lda + k);
      acc[r][0] = reg_fma(x, b0, acc[r][0]), acc[r][1] = reg_fma(x, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    Reg lo = acc[r][0], hi = acc[r][1];
    if constexpr (kBias) {
      const Reg br = reg_bcast(bias + r);
      lo = reg_add(lo, br), hi = reg_add(hi, br);
      mx[0] = reg_max(mx[0], lo), mx[1] = reg_max(mx[1], hi);
    }
    if (nn == kPanel) {
      if (accumulate) lo = reg_add(lo, reg_loadu(cr)), hi = reg_add(hi, reg_loadu(cr + kLanes));
      reg_storeu(cr, lo), reg_storeu(cr + kLanes, hi);
    } else {
      alignas(64) float tmp[kPanel];
      reg_storeu(tmp, lo), reg_storeu(tmp + kLanes, hi);
      for (int64_t j = 0; j < nn; ++j) cr[j] = accumulate ? cr[j] + tmp[j] : tmp[j];
    }
  }
}

using PanelKernel = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool, const float*, Reg*);

template <bool kBias, int... R>
static constexpr std::array<PanelKernel, sizeof...(R)> panel_kernels(std::integer_sequence<int, R...>) {
  return {panel_kernel<R + 1, kBias>...};
}

// [R - 1]: the kernel for R rows; the logits' kernel with its bias and max
static constexpr auto kKernels = panel_kernels<false>(std::make_integer_sequence<int, kRows>{});
static constexpr auto kLogitKernels = panel_kernels<true>(std::make_integer_sequence<int, kRows>{});

// M rows of A by one packed panel, kRows rows at a time: C[:, 0:nn] (+)= A B[:, panel columns].
static void rows_by_panel(const float* A, int64_t lda, int64_t M, const float* bp, int64_t K, float* C, int64_t ldc, int64_t nn,
                          bool accumulate) {
  for (int64_t m0 = 0; m0 < M; m0 += kRows)
    kKernels[std::min<int64_t>(kRows, M - m0) - 1](A + m0 * lda, lda, bp, K, C + m0 * ldc, ldc, nn, accumulate, nullptr, nullptr);
}

// C (M x N, row stride ldc) = A (M x K, row stride lda) B, or C += A B with `accumulate`.
static void small_gemm(const float* A, int64_t lda, const Packed& B, float* C, int64_t ldc, int64_t M, bool accumulate) {
  const int64_t K = B.K, N = B.N, P = (N + kPanel - 1) / kPanel;
  const float* panels = B.panels.data_ptr<float>();
  at::parallel_for(0, P, 384 / kPanel, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* bp = panels + p * K * kPanel;
      const int64_t n0 = p * kPanel, nn = std::min<int64_t>(kPanel, N - n0);
      rows_by_panel(A, lda, M, bp, K, C + n0, ldc, nn, accumulate);
    }
  });
}

// The layer forwards from its inputs xs (T, B, d): the input part of every step's gate
// pre-activations at once (x W_ih^T, by the packed-panel kernel), then the time loop, each step's
// recurrent product added and its gates (with `bias`, b_ih + b_hh) activated in one pass.
// Returns the activations (T, B, 4H), c (T+1, B, H), tanh(c) (T, B, H), hf (T, B, H), h (T+1, B, P).
std::vector<torch::Tensor> lstm_forward(torch::Tensor xs, torch::Tensor w_ih, torch::Tensor bias, torch::Tensor w_hh,
                                        torch::Tensor w_hr, torch::Tensor h0, torch::Tensor c0) {
  for (auto* t : {&xs, &w_ih, &bias, &w_hh, &w_hr, &h0, &c0}) check_f32(*t, "lstm_forward: every input");
  TORCH_CHECK(xs.dim() == 3 && w_hr.dim() == 2, "lstm_forward: xs must be (T, B, d) and w_hr (P, H)");
  const int64_t T = xs.size(0), B = xs.size(1), D = xs.size(2), H = w_hr.size(1), P = w_hr.size(0);
  TORCH_CHECK(w_ih.sizes() == torch::IntArrayRef({4 * H, D}) && bias.sizes() == torch::IntArrayRef({4 * H}) &&
                  w_hh.sizes() == torch::IntArrayRef({4 * H, P}) && h0.sizes() == torch::IntArrayRef({B, P}) &&
                  c0.sizes() == torch::IntArrayRef({B, H}),
              "lstm_forward: weight or state shapes do not match the inputs");
  auto gates = torch::empty({T, B, 4 * H}, xs.options());
  auto cs = torch::empty({T + 1, B, H}, xs.options()), hs = torch::empty({T + 1, B, P}, xs.options());
  auto tcs = torch::empty({T, B, H}, xs.options()), hfs = torch::empty({T, B, H}, xs.options());
  cs[0].copy_(c0), hs[0].copy_(h0);
  float *a = gates.data_ptr<float>(), *c = cs.data_ptr<float>(), *tc = tcs.data_ptr<float>();
  float *hf = hfs.data_ptr<float>(), *h = hs.data_ptr<float>();
  const float* bs = bias.data_ptr<float>();
  small_gemm(xs.data_ptr<float>(), D, pack_panels(w_ih, true), a, 4 * H, T * B, false);  // B = W_ih^T
  const Packed w_hh_t = pack_panels(w_hh, true), w_hr_t = pack_panels(w_hr, true);  // B = W^T
  for (int64_t t = 0; t < T; ++t) {
    float* at = a + t * B * 4 * H;
    small_gemm(h + t * B * P, P, w_hh_t, at, 4 * H, B, true);
    cell_forward(at, bs, c + t * B * H, c + (t + 1) * B * H, tc + t * B * H, hf + t * B * H, B, H);
    small_gemm(hf + t * B * H, H, w_hr_t, h + (t + 1) * B * P, P, B, false);
  }
  return {gates, cs, tcs, hfs, hs};
}

// Backpropagation through time.  g_hs (T, B, P): the gradient at each step's output, updated in
// place to the total gradient there (what W_hr's gradient needs).  Returns the gradient at the
// gate pre-activations (T, B, 4H) and at h0 and c0.
std::vector<torch::Tensor> lstm_backward(torch::Tensor acts, torch::Tensor cs, torch::Tensor tcs, torch::Tensor g_hs,
                                         torch::Tensor w_hh, torch::Tensor w_hr, torch::Tensor dh, torch::Tensor dc) {
  for (auto* t : {&acts, &cs, &tcs, &g_hs, &w_hh, &w_hr, &dh, &dc}) check_f32(*t, "lstm_backward: every input");
  TORCH_CHECK(acts.dim() == 3 && acts.size(2) % 4 == 0, "lstm_backward: acts must be (T, B, 4H)");
  const int64_t T = acts.size(0), B = acts.size(1), H = acts.size(2) / 4, P = w_hr.size(0);
  TORCH_CHECK(cs.sizes() == torch::IntArrayRef({T + 1, B, H}) && tcs.sizes() == torch::IntArrayRef({T, B, H}) &&
                  g_hs.sizes() == torch::IntArrayRef({T, B, P}) && w_hh.sizes() == torch::IntArrayRef({4 * H, P}) &&
                  w_hr.sizes() == torch::IntArrayRef({P, H}) && dh.sizes() == torch::IntArrayRef({B, P}) &&
                  dc.sizes() == torch::IntArrayRef({B, H}),
              "lstm_backward: shapes do not match the saved activations");
  auto d_gates = torch::empty_like(acts), dhf = torch::empty({B, H}, acts.options());
  dh = dh.clone(), dc = dc.clone();
  const Packed w_hr_p = pack_panels(w_hr, false), w_hh_p = pack_panels(w_hh, false);  // B = W
  const float *a = acts.data_ptr<float>(), *c = cs.data_ptr<float>(), *tc = tcs.data_ptr<float>();
  float *g = g_hs.data_ptr<float>(), *dg = d_gates.data_ptr<float>(), *dhf_ = dhf.data_ptr<float>();
  float *dh_ = dh.data_ptr<float>(), *dc_ = dc.data_ptr<float>();
  for (int64_t t = T - 1; t >= 0; --t) {
    float* dh_t = g + t * B * P;
    for (int64_t i = 0; i < B * P; ++i) dh_t[i] += dh_[i];
    small_gemm(dh_t, P, w_hr_p, dhf_, H, B, false);
    cell_backward(a + t * B * 4 * H, c + t * B * H, tc + t * B * H, dhf_, dc_, dg + t * B * 4 * H, B, H);
    small_gemm(dg + t * B * 4 * H, 4 * H, w_hh_p, dh_, P, B, false);
  }
  return {d_gates, dh, dc};
}

// The tied output layer's forward and its cross-entropy gradient, fused.  The logits are computed
// transposed, words x tokens (Z^T = E h^T), by the packed-panel kernel with the words as its rows
// (read straight from E, nothing to pack) and blocks of kPanel tokens as its panels (h^T, packed
// once, in L1).  The vocabulary goes in chunks of kChunk words, each chunk's rows of E (192 kB)
// staying in L2 while every token block uses them; a chunk's logits for one token block (64 kB)
// get their biases and are turned into e^(z - m) with m the chunk's max, while in cache: the
// softmax's max and sum are taken chunk by chunk and merged (the online softmax of Milakov &
// Gimelshein 2018, "Online normalizer calculation for softmax"), so the logits are computed once.
// A last pass turns each chunk's rows into (softmax - onehot) * scale (Bishop 2006, sec. 4.3.4)
// with one factor per chunk and token, and takes the bias gradient's row sums.  Chunks are merged
// in order and each row is summed by one thread: the result does not depend on the thread count.
// Returns the gradient (N, V) (a transposed view of a (V, N rounded up) matrix, which MKL's
// products read as it is), each token's cross-entropy (N,) and the gradient's column sums (V,):
// the same numbers as h @ emb.t() + bias then softmax cross-entropy, to float rounding.
std::vector<torch::Tensor> tied_softmax_xent(torch::Tensor h, torch::Tensor emb, torch::Tensor bias, torch::Tensor targets,
                                             double scale) {
  check_f32(h, "tied_softmax_xent: h"), check_f32(emb, "tied_softmax_xent: emb"), check_f32(bias, "tied_softmax_xent: bias");
  check_i64(targets, "tied_softmax_xent: targets");
  TORCH_CHECK(h.dim() == 2 && emb.dim() == 2 && h.size(1) == emb.size(1) && bias.dim() == 1 && bias.size(0) == emb.size(0) &&
                  targets.size(0) == h.size(0),
              "tied_softmax_xent: h (N, d), emb (V, d), bias (V,) and targets (N,) do not match");
  const int64_t N = h.size(0), V = emb.size(0), d = h.size(1);
  check_range(targets, V, "tied_softmax_xent: a target is outside the vocabulary");
  constexpr int64_t kChunk = 512;
  const int64_t ld = (N + kPanel - 1) / kPanel * kPanel, blocks = ld / kPanel, chunks = (V + kChunk - 1) / kChunk;
  const Packed ht = pack_panels(h, true);  // one panel per token block: d x kPanel, zero past the last token
  auto grad_t = torch::empty({V, ld}, h.options()), loss = torch::empty({N}, h.options()), colsums = torch::empty({V}, h.options());
  auto stats = torch::empty({2, chunks, ld}, h.options());  // each chunk's max and sum of e^(z - max), per token
  const float *E = emb.data_ptr<float>(), *bs = bias.data_ptr<float>(), *panels = ht.panels.data_ptr<float>();
  const int64_t* y = targets.data_ptr<int64_t>();
  float *G = grad_t.data_ptr<float>(), *out = loss.data_ptr<float>(), *cm = stats[0].data_ptr<float>(), *cs = stats[1].data_ptr<float>();
  std::vector<float> picked(N);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t v0 = c * kChunk, v1 = std::min(V, v0 + kChunk);
      for (int64_t b = 0; b < blocks; ++b) {
        float* Gb = G + b * kPanel;  // this block's columns: row v at Gb + v * ld
        Reg mx[2];  // the logits, kRows words at a time, with their biases and the block's max in registers
        mx[0] = mx[1] = Vec(-std::numeric_limits<float>::infinity());
        for (int64_t r0 = v0; r0 < v1; r0 += kRows)
          kLogitKernels[std::min<int64_t>(kRows, v1 - r0) - 1](E + r0 * d, d, panels + b * d * kPanel, d, Gb + r0 * ld, ld, kPanel,
                                                               false, bs + r0, mx);
        const Vec m_lo(mx[0]), m_hi(mx[1]);  // a NaN logit may drop out of the max, never out of the sum below
        for (int64_t j = b * kPanel; j < std::min(N, (b + 1) * kPanel); ++j)
          if (y[j] >= v0 && y[j] < v1) picked[j] = G[y[j] * ld + j];  // the target's logit
        Vec s_lo(0.0f), s_hi(0.0f);
        for (int64_t v = v0; v < v1; ++v) {  // e^(z - chunk max), and its sum
          float* row = Gb + v * ld;
          const Vec lo = (Vec::loadu(row) - m_lo).exp_u20(), hi = (Vec::loadu(row + kLanes) - m_hi).exp_u20();
          lo.store(row), hi.store(row + kLanes);
          s_lo = s_lo + lo, s_hi = s_hi + hi;
        }
        float *m = cm + c * ld + b * kPanel, *sum = cs + c * ld + b * kPanel;
        m_lo.store(m), m_hi.store(m + kLanes), s_lo.store(sum), s_hi.store(sum + kLanes);
      }
    }
  });
  // Merge the chunks in order: each token's max M and sum S; the loss; each chunk's factor
  // e^(m_c - M) * scale / S, written over its max (0 for the padding tokens).
  const float s = static_cast<float>(scale);
  for (int64_t j = 0; j < ld; ++j) {
    float M = -std::numeric_limits<float>::infinity(), S = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) M = std::max(M, cm[c * ld + j]);
    for (int64_t c = 0; c < chunks; ++c) S += cs[c * ld + j] * std::exp(cm[c * ld + j] - M);
    if (j < N) out[j] = M + std::log(S) - picked[j];  // log-sum-exp minus the target's logit
    for (int64_t c = 0; c < chunks; ++c) cm[c * ld + j] = j < N ? std::exp(cm[c * ld + j] - M) * s / S : 0.0f;
  }
  float* cols = colsums.data_ptr<float>();
  at::parallel_for(0, V, 256, [&](int64_t lo, int64_t hi) {  // softmax * scale, row by row, and each row's sum
    constexpr int64_t n = Vec::size();
    for (int64_t v = lo; v < hi; ++v) {
      float *row = G + v * ld, *f = cm + (v / kChunk) * ld;
      Vec acc(0.0f);
      for (int64_t j = 0; j < ld; j += n) {
        const Vec g = Vec::loadu(row + j) * Vec::loadu(f + j);
        g.store(row + j);
        acc = acc + g;
      }
      cols[v] = acc.reduce_add();
    }
  });
  for (int64_t j = 0; j < N; ++j) G[y[j] * ld + j] -= s, cols[y[j]] -= s;  // - onehot * scale
  return {grad_t.narrow(1, 0, N).t(), loss, colsums};
}

// The word table: emb[w] = mean of the piece rows of word w (+ residual[w] for w < r), and the
// same for the biases.  pieces / offsets: embedding_bag's layout.  Parallel over words.
std::vector<torch::Tensor> compose_forward(torch::Tensor pieces, torch::Tensor offsets, torch::Tensor piece_emb,
                                           torch::Tensor piece_bias, torch::Tensor residual, torch::Tensor word_bias,
                                           int64_t r) {
  check_i64(pieces, "compose_forward: pieces"), check_i64(offsets, "compose_forward: offsets");
  for (auto* t : {&piece_emb, &piece_bias, &residual, &word_bias}) check_f32(*t, "compose_forward: every table");
  const int64_t V = offsets.size(0), d = piece_emb.size(1), total = pieces.size(0);
  TORCH_CHECK(r >= 0 && r <= V && r <= residual.size(0) && r <= word_bias.size(0) && residual.size(1) == d &&
                  piece_bias.size(0) == piece_emb.size(0),
              "compose_forward: table shapes do not match");
  if (V > 0) {
    TORCH_CHECK(rises_from_zero(offsets, true) && offsets.data_ptr<int64_t>()[V - 1] < total,
                "compose_forward: every word needs at least one piece");
  }
  check_range(pieces, piece_emb.size(0), "compose_forward: a piece id is out of range");
  auto emb = torch::empty({V, d}, piece_emb.options()), bias = torch::empty({V}, piece_emb.options());
  const int64_t *pc = pieces.data_ptr<int64_t>(), *off = offsets.data_ptr<int64_t>();
  const float *P = piece_emb.data_ptr<float>(), *Pb = piece_bias.data_ptr<float>();
  const float *R = residual.data_ptr<float>(), *Rb = word_bias.data_ptr<float>();
  float *E = emb.data_ptr<float>(), *Eb = bias.data_ptr<float>();
  at::parallel_for(0, V, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t a = off[w], z = w + 1 < V ? off[w + 1] : total;
      float* e = E + w * d;
      std::copy(P + pc[a] * d, P + pc[a] * d + d, e);
      float eb = Pb[pc[a]];
      for (int64_t k = a + 1; k < z; ++k) {
        at::vec::map2<float>([](Vec x, Vec y) { return x + y; }, e, e, P + pc[k] * d, d);
        eb += Pb[pc[k]];
      }
      const float n = static_cast<float>(z - a);
      if (w < r) {
        at::vec::map2<float>([n](Vec x, Vec y) { return x / Vec(n) + y; }, e, e, R + w * d, d);
        Eb[w] = eb / n + Rb[w];
      } else {
        at::vec::map<float>([n](Vec x) { return x / Vec(n); }, e, e, d);
        Eb[w] = eb / n;
      }
    }
  });
  return {emb, bias};
}

// Its backward for the pieces: g_piece = S^T g, with S^T as CSR (pieces x words, 1/n per entry).
// Parallel over pieces.  The residual rows' gradient is the words' own, sliced by the caller.
std::vector<torch::Tensor> compose_backward(torch::Tensor crow, torch::Tensor col, torch::Tensor val, torch::Tensor g_emb,
                                            torch::Tensor g_bias) {
  check_i64(crow, "compose_backward: crow"), check_i64(col, "compose_backward: col");
  check_f32(val, "compose_backward: values"), check_f32(g_emb, "compose_backward: g_emb"), check_f32(g_bias, "compose_backward: g_bias");
  TORCH_CHECK(g_emb.dim() == 2 && g_bias.size(0) == g_emb.size(0) && col.size(0) == val.size(0) && crow.size(0) >= 1,
              "compose_backward: shapes do not match");
  const int64_t Pn = crow.size(0) - 1, d = g_emb.size(1);
  TORCH_CHECK(rises_from_zero(crow, false) && crow.data_ptr<int64_t>()[Pn] == col.size(0),
              "compose_backward: the row pointers do not span the column indices");
  check_range(col, g_emb.size(0), "compose_backward: a word index is out of range");
  auto gp = torch::empty({Pn, d}, g_emb.options()), gpb = torch::empty({Pn}, g_emb.options());
  const int64_t *cr = crow.data_ptr<int64_t>(), *cl = col.data_ptr<int64_t>();
  const float *v = val.data_ptr<float>(), *G = g_emb.data_ptr<float>(), *Gb = g_bias.data_ptr<float>();
  float *out = gp.data_ptr<float>(), *outb = gpb.data_ptr<float>();
  at::parallel_for(0, Pn, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      float* o = out + p * d;
      float ob = 0.0f;
      const int64_t k0 = cr[p], k1 = cr[p + 1];
      if (k0 == k1) {
        std::fill(o, o + d, 0.0f);
      } else {  // the first term written, not added to a zero fill: 0 + a y, the same bits, one pass less
        const float a = v[k0];
        at::vec::map<float>([a](Vec y) { return Vec(0.0f) + Vec(a) * y; }, o, G + cl[k0] * d, d);
        ob += a * Gb[cl[k0]];
      }
      for (int64_t k = k0 + 1; k < k1; ++k) {
        const float a = v[k];
        at::vec::map2<float>([a](Vec x, Vec y) { return x + Vec(a) * y; }, o, o, G + cl[k] * d, d);
        ob += a * Gb[cl[k]];
      }
      outb[p] = ob;
    }
  });
  return {gp, gpb};
}

// Gradient clipping by global norm (Pascanu et al. 2013, "On the difficulty of training recurrent
// neural networks") and a plain SGD step, what clip_grad_norm_ and SGD (no momentum) do, in two
// passes over memory instead of five: the squared norms, then p -= lr * g * min(1, max_norm /
// (norm + 1e-6)).  A non-finite norm makes every parameter NaN, as it does in PyTorch.  Returns
// the norm.
double clip_sgd_(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads, double max_norm, double lr) {
  TORCH_CHECK(params.size() == grads.size(), "clip_sgd_: one gradient per parameter");
  for (size_t i = 0; i < params.size(); ++i) {
    check_f32(params[i], "clip_sgd_: every parameter"), check_f32(grads[i], "clip_sgd_: every gradient");
    TORCH_CHECK(params[i].sizes() == grads[i].sizes(), "clip_sgd_: a gradient's shape differs from its parameter's");
  }
  // The squared norm in blocks of a fixed size, summed in order: the same bits on any number of
  // threads (at::parallel_reduce's per-thread partials would depend on it).
  constexpr int64_t kBlock = 1 << 15;
  double total = 0.0;
  std::vector<double> parts;
  for (auto& g : grads) {
    const float* x = g.data_ptr<float>();
    const int64_t numel = g.numel(), blocks = (numel + kBlock - 1) / kBlock;
    parts.assign(blocks, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        constexpr int64_t n = Vec::size();
        const int64_t lo = b * kBlock, hi = std::min(numel, lo + kBlock);
        Vec v(0.0f);
        int64_t j = lo;
        for (; j + n <= hi; j += n) { Vec y = Vec::loadu(x + j); v = at::vec::fmadd(y, y, v); }
        float part = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
        for (; j < hi; ++j) part += x[j] * x[j];
        parts[b] = part;
      }
    });
    for (double part : parts) total += part;
  }
  const double norm = std::sqrt(total);
  float coef = static_cast<float>(max_norm / (norm + 1e-6));
  if (coef > 1.0f) coef = 1.0f;  // NaN stays NaN
  const Vec vc(coef), vl(static_cast<float>(-lr));
  for (size_t i = 0; i < params.size(); ++i) {
    float* w = params[i].data_ptr<float>();
    const float* g = grads[i].data_ptr<float>();
    at::parallel_for(0, params[i].numel(), 1 << 15, [&](int64_t lo, int64_t hi) {
      constexpr int64_t n = Vec::size();
      int64_t j = lo;
      for (; j + n <= hi; j += n) (Vec::loadu(w + j) + vl * (Vec::loadu(g + j) * vc)).store(w + j);
      for (; j < hi; ++j) w[j] += static_cast<float>(-lr) * (g[j] * coef);
    });
  }
  return norm;
}

// MT19937's state update (Matsumoto & Nishimura 1998, "Mersenne Twister"), as at::mt19937 runs it,
// in plain loops the compiler vectorizes (each reads words 1 and 397 ahead, or 227 behind).
static inline uint32_t mt_twist(uint32_t u, uint32_t v) {
  return (((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ ((0u - (v & 1u)) & at::MATRIX_A);
}

static void mt_next_state(at::mt19937_data_pod& d) {
  constexpr int N = at::MERSENNE_STATE_N, M = at::MERSENNE_STATE_M;
  uint32_t* p = d.state_.data();
  for (int i = 0; i < N - M; ++i) p[i] = p[i + M] ^ mt_twist(p[i], p[i + 1]);
  for (int i = N - M; i < N - 1; ++i) p[i] = p[i + M - N] ^ mt_twist(p[i], p[i + 1]);
  p[N - 1] = p[M - 1] ^ mt_twist(p[N - 1], p[0]);
  d.left_ = N, d.next_ = 0;
}

// The next n outputs of the engine whose state is d, exactly what n calls of at::mt19937 would give.
static void mt_fill(at::mt19937_data_pod& d, uint32_t* out, int64_t n) {
  int64_t i = 0;
  while (i < n) {
    if (d.left_ == 1) {  // the call that finds the state spent renews it and returns its first word
      mt_next_state(d);
      out[i++] = d.state_[d.next_++];
      continue;
    }
    const int64_t k = std::min<int64_t>(n - i, d.left_ - 1);
    std::copy(d.state_.data() + d.next_, d.state_.data() + d.next_ + k, out + i);
    d.left_ -= k, d.next_ += k, i += k;
  }
  for (int64_t j = 0; j < n; ++j) {  // tempering
    uint32_t y = out[j];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    out[j] = y ^ (y >> 18);
  }
}

// Dropout's keep mask (float32): the numbers torch.empty_like(like).bernoulli_(p, generator=gen) gives
// on the CPU (ATen's serial Bernoulli kernel: per element, in order, a 64-bit draw made of two MT19937
// outputs, its low 53 bits as a double in [0, 1), 1 if below p), the engine's outputs made in bulk
// from a copy of its state, which is then put back: the generator ends where bernoulli_ leaves it.
// models/sgd_step.py checks it against bernoulli_ once per process before using it.
torch::Tensor bernoulli_mask(torch::Tensor like, double p, at::Generator gen) {
  TORCH_CHECK(p >= 0 && p <= 1, "bernoulli_mask: p must be in [0, 1]");
  auto out = torch::empty(like.sizes(), like.options().dtype(torch::kFloat).memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = out.numel();
  std::vector<uint32_t> raw(2 * n);
  auto* g = at::check_generator<at::CPUGeneratorImpl>(gen);
  {
    std::lock_guard<std::mutex> lock(g->mutex_);
    at::mt19937 engine = g->engine();
    at::mt19937_data_pod d = engine.data();
    mt_fill(d, raw.data(), 2 * n);
    engine.set_data(d);
    g->set_engine(engine);
  }
  // u = (bits & (2^53 - 1)) * 2^-53 < p, exactly: bits & (2^53 - 1) < ceil(p * 2^53) (both sides scaled by 2^53)
  const double two53 = static_cast<double>(uint64_t{1} << 53);
  const uint64_t below = p <= 0 ? 0 : p >= 1 ? uint64_t{1} << 53 : static_cast<uint64_t>(std::ceil(p * two53));
  constexpr uint64_t kMask = (uint64_t{1} << 53) - 1;
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    o[i] = ((((uint64_t)raw[2 * i] << 32) | raw[2 * i + 1]) & kMask) < below ? 1.0f : 0.0f;
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward", &lstm_forward, "LSTM layer with a projection, forwards");
  m.def("lstm_backward", &lstm_backward, "LSTM time loop with a projection, backwards");
  m.def("tied_softmax_xent", &tied_softmax_xent, "the tied output layer's logits and softmax cross-entropy gradient");
  m.def("compose_forward", &compose_forward, "word table from pieces and residuals");
  m.def("compose_backward", &compose_backward, "the pieces' gradient from the word table's");
  m.def("clip_sgd_", &clip_sgd_, "gradient clipping by global norm and an SGD step, in place");
  m.def("bernoulli_mask", &bernoulli_mask, "bernoulli_'s keep mask from the same generator, faster");
}
