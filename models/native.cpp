// Native CPU kernels for a local training step, each fused so that its element-wise work makes
// one pass over memory; the large matrix products stay ATen's (MKL):
//   * the projected LSTM's time loop, forwards and backwards: the LSTM of Hochreiter &
//     Schmidhuber 1997 with nn.LSTM's projection, backpropagation through time (Werbos 1990),
//     its batch-row products by a small packed-panel kernel (Goto & van de Geijn 2008);
//   * the tied output layer: its logits (the packed-panel kernel) and the softmax cross-entropy
//     gradient (softmax - onehot) / N (Bishop 2006, "Pattern Recognition and Machine Learning",
//     sec. 4.3.4), eight rows at a time in cache;
//   * the subword composition of the word table (mean of a word's pieces, Bojanowski et al.
//     2017) and its backward;
//   * gradient clipping by global norm with the SGD step.
// Loaded (compiled on first use) by models/native.py; models/fused.py runs its PyTorch version
// of each where they are not loaded.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <cmath>
#include <functional>
#include <limits>

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

// Every value of the int64 vector `ids` lies in [0, n): rows it may index.
static void check_range(const torch::Tensor& ids, int64_t n, const char* what) {
  if (ids.size(0) > 0) {
    const auto [lo, hi] = torch::aminmax(ids);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < n, what);
  }
}

static inline Vec sigmoid(Vec x) { return Vec(1.0f) / (Vec(1.0f) + x.neg().exp()); }
static inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// One time step of the cell, batch row by batch row: a (B, 4H) gate pre-activations [i f g o]
// become their activations in place; c = f * c_prev + i * g, tc = tanh(c), hf = o * tc.
static void cell_forward(float* a, const float* c_prev, float* c, float* tc, float* hf, int64_t B, int64_t H) {
  constexpr int64_t n = Vec::size();
  for (int64_t b = 0; b < B; ++b) {
    float *ai = a + b * 4 * H, *af = ai + H, *ag = ai + 2 * H, *ao = ai + 3 * H;
    const float* cp = c_prev + b * H;
    float *cb = c + b * H, *tb = tc + b * H, *hb = hf + b * H;
    int64_t j = 0;
    for (; j + n <= H; j += n) {
      Vec i = sigmoid(Vec::loadu(ai + j)), f = sigmoid(Vec::loadu(af + j));
      Vec g = Vec::loadu(ag + j).tanh(), o = sigmoid(Vec::loadu(ao + j));
      i.store(ai + j), f.store(af + j), g.store(ag + j), o.store(ao + j);
      Vec cc = f * Vec::loadu(cp + j) + i * g, t = cc.tanh();
      cc.store(cb + j), t.store(tb + j), (o * t).store(hb + j);
    }
    for (; j < H; ++j) {
      float i = sigmoid(ai[j]), f = sigmoid(af[j]), g = std::tanh(ag[j]), o = sigmoid(ao[j]);
      ai[j] = i, af[j] = f, ag[j] = g, ao[j] = o;
      float cc = f * cp[j] + i * g, t = std::tanh(cc);
      cb[j] = cc, tb[j] = t, hb[j] = o * t;
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
    int64_t j = 0;
    for (; j + n <= H; j += n) {
      Vec i = Vec::loadu(ai + j), f = Vec::loadu(af + j), g = Vec::loadu(ag + j), o = Vec::loadu(ao + j);
      Vec t = Vec::loadu(tb + j), dh = Vec::loadu(hb + j);
      Vec d = Vec::loadu(db + j) + dh * o * (one - t * t);
      (d * g * i * (one - i)).store(di + j);
      (d * Vec::loadu(cp + j) * f * (one - f)).store(df + j);
      (d * i * (one - g * g)).store(dgg + j);
      (dh * t * o * (one - o)).store(dout + j);
      (d * f).store(db + j);
    }
    for (; j < H; ++j) {
      float i = ai[j], f = af[j], g = ag[j], o = ao[j], t = tb[j], dh = hb[j];
      float d = db[j] + dh * o * (1 - t * t);
      di[j] = d * g * i * (1 - i), df[j] = d * cp[j] * f * (1 - f), dgg[j] = d * i * (1 - g * g), dout[j] = dh * t * o * (1 - o);
      db[j] = d * f;
    }
  }
}

// The recurrence's products have as many rows as the batch (8): BLAS kernels are built for large
// matrices and run these at about half their speed.  Here the weight, fixed for the whole time
// loop, is packed once into panels of 16 columns (K x 16 floats each, read from cache), and a
// register-blocked kernel (4 rows x 16 columns of accumulators, the micro-kernel design of
// Goto & van de Geijn 2008, "Anatomy of High-Performance Matrix Multiplication") multiplies a
// few rows by one panel at a time.
struct Packed {
  torch::Tensor panels;  // (ceil(N / 16), K, 16), zero-padded past column N
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
  const int64_t P = (N + 15) / 16;
  auto panels = torch::empty({P, K, 16}, w.options());
  const float* src = w.data_ptr<float>();
  float* out = panels.data_ptr<float>();
  at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * 16, nn = std::min<int64_t>(16, N - n0);
      float* panel = out + p * K * 16;
      if (nn < 16) std::fill(panel, panel + K * 16, 0.0f);  // the last panel's missing columns stay zero
      if (!transposed) {
        for (int64_t k = 0; k < K; ++k) std::copy(src + k * N + n0, src + k * N + n0 + nn, panel + k * 16);
        continue;
      }
      int64_t k0 = 0;
      if (nn == 16)  // column n of B is row n of w: 8 x 8 blocks transposed in registers
        for (; k0 + 8 <= K; k0 += 8)
          for (int64_t j0 = 0; j0 < 16; j0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (n0 + j0 + i) * K + k0);
            transpose8(r);
            for (int i = 0; i < 8; ++i) _mm256_store_ps(panel + (k0 + i) * 16 + j0, r[i]);
          }
      for (int64_t j = 0; j < nn; ++j)
        for (int64_t k = k0; k < K; ++k) panel[k * 16 + j] = src[(n0 + j) * K + k];
    }
  });
  return {panels, K, N};
}

// R rows (1..4) of A by one packed panel: C[r, 0:nn] (+)= sum_k A[r, k] B[k, panel columns].
template <int R>
static inline void panel_kernel(const float* a, int64_t lda, const float* bp, int64_t K, float* c, int64_t ldc, int64_t nn,
                                bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_load_ps(bp + k * 16), b1 = _mm256_load_ps(bp + k * 16 + 8);
    __m256 x = _mm256_broadcast_ss(a + k);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    if (R > 1) x = _mm256_broadcast_ss(a + lda + k), c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    if (R > 2) x = _mm256_broadcast_ss(a + 2 * lda + k), c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    if (R > 3) x = _mm256_broadcast_ss(a + 3 * lda + k), c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
  }
  const __m256 acc[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (nn == 16) {
      __m256 lo = acc[r][0], hi = acc[r][1];
      if (accumulate) lo = _mm256_add_ps(lo, _mm256_loadu_ps(cr)), hi = _mm256_add_ps(hi, _mm256_loadu_ps(cr + 8));
      _mm256_storeu_ps(cr, lo), _mm256_storeu_ps(cr + 8, hi);
    } else {
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, acc[r][0]), _mm256_store_ps(tmp + 8, acc[r][1]);
      for (int64_t j = 0; j < nn; ++j) cr[j] = accumulate ? cr[j] + tmp[j] : tmp[j];
    }
  }
}

// M rows of A by one packed panel, 4 rows at a time: C[:, 0:nn] (+)= A B[:, panel columns].
static void rows_by_panel(const float* A, int64_t lda, int64_t M, const float* bp, int64_t K, float* C, int64_t ldc, int64_t nn,
                          bool accumulate) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* a = A + m0 * lda;
    float* c = C + m0 * ldc;
    switch (std::min<int64_t>(4, M - m0)) {
      case 4: panel_kernel<4>(a, lda, bp, K, c, ldc, nn, accumulate); break;
      case 3: panel_kernel<3>(a, lda, bp, K, c, ldc, nn, accumulate); break;
      case 2: panel_kernel<2>(a, lda, bp, K, c, ldc, nn, accumulate); break;
      default: panel_kernel<1>(a, lda, bp, K, c, ldc, nn, accumulate);
    }
  }
}

// C (M x N, row stride ldc) = A (M x K, row stride lda) B, or C += A B with `accumulate`.
static void small_gemm(const float* A, int64_t lda, const Packed& B, float* C, int64_t ldc, int64_t M, bool accumulate) {
  const int64_t K = B.K, N = B.N, P = (N + 15) / 16;
  const float* panels = B.panels.data_ptr<float>();
  at::parallel_for(0, P, 24, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* bp = panels + p * K * 16;
      const int64_t n0 = p * 16, nn = std::min<int64_t>(16, N - n0);
      rows_by_panel(A, lda, M, bp, K, C + n0, ldc, nn, accumulate);
    }
  });
}

// gates (T, B, 4H): the input part of the pre-activations (x W_ih^T + biases), turned into the
// activations in place.  Returns c (T+1, B, H), tanh(c) (T, B, H), hf (T, B, H), h (T+1, B, P).
std::vector<torch::Tensor> lstm_forward(torch::Tensor gates, torch::Tensor w_hh, torch::Tensor w_hr, torch::Tensor h0,
                                        torch::Tensor c0) {
  for (auto* t : {&gates, &w_hh, &w_hr, &h0, &c0}) check_f32(*t, "lstm_forward: every input");
  TORCH_CHECK(gates.dim() == 3 && gates.size(2) % 4 == 0, "lstm_forward: gates must be (T, B, 4H)");
  const int64_t T = gates.size(0), B = gates.size(1), H = gates.size(2) / 4, P = w_hr.size(0);
  TORCH_CHECK(w_hh.sizes() == torch::IntArrayRef({4 * H, P}) && w_hr.sizes() == torch::IntArrayRef({P, H}) &&
                  h0.sizes() == torch::IntArrayRef({B, P}) && c0.sizes() == torch::IntArrayRef({B, H}),
              "lstm_forward: weight or state shapes do not match the gates");
  auto cs = torch::empty({T + 1, B, H}, gates.options()), hs = torch::empty({T + 1, B, P}, gates.options());
  auto tcs = torch::empty({T, B, H}, gates.options()), hfs = torch::empty({T, B, H}, gates.options());
  cs[0].copy_(c0), hs[0].copy_(h0);
  const Packed w_hh_t = pack_panels(w_hh, true), w_hr_t = pack_panels(w_hr, true);  // B = W^T
  float *a = gates.data_ptr<float>(), *c = cs.data_ptr<float>(), *tc = tcs.data_ptr<float>();
  float *hf = hfs.data_ptr<float>(), *h = hs.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float* at = a + t * B * 4 * H;
    small_gemm(h + t * B * P, P, w_hh_t, at, 4 * H, B, true);
    cell_forward(at, c + t * B * H, c + (t + 1) * B * H, tc + t * B * H, hf + t * B * H, B, H);
    small_gemm(hf + t * B * H, H, w_hr_t, h + (t + 1) * B * P, P, B, false);
  }
  return {cs, tcs, hfs, hs};
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

// One row of logits (V, bias not yet added) becomes, in place, the gradient of its cross-entropy
// times `s`: (softmax(row + bias) - onehot(y)) * s; adds it to the column sums `acc` and returns
// the row's cross-entropy.  Three passes over the row (bias and max, exp and sum, scale), in cache.
static float softmax_xent_row(float* row, const float* bs, int64_t V, int64_t y, float s, float* acc) {
  constexpr int64_t n = Vec::size();
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + n <= V; j += n) {
    Vec x = Vec::loadu(row + j) + Vec::loadu(bs + j);
    x.store(row + j);
    vmax = at::vec::maximum(vmax, x);
  }
  float top = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; j < V; ++j) top = std::max(top, row[j] += bs[j]);
  const float picked = row[y];
  Vec vsum(0.0f), vtop(top);
  for (j = 0; j + n <= V; j += n) {
    Vec e = (Vec::loadu(row + j) - vtop).exp_u20();
    e.store(row + j);
    vsum = vsum + e;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; j < V; ++j) total += (row[j] = std::exp(row[j] - top));
  const float k = s / total;
  row[y] -= total;  // (e - total) * k = (p - 1) * scale at the target
  const Vec vk(k);
  for (j = 0; j + n <= V; j += n) {
    Vec gr = Vec::loadu(row + j) * vk;
    gr.store(row + j);
    (Vec::loadu(acc + j) + gr).store(acc + j);
  }
  for (; j < V; ++j) acc[j] += (row[j] *= k);
  return top + std::log(total) - picked;
}

// The tied output layer's forward and its cross-entropy gradient, fused: for each block of 8 rows
// of h, the logits h E^T (packed-panel kernel over the whole vocabulary) are computed and turned
// into (softmax - onehot) * scale while they are in cache, so the (N, V) logits go to memory once,
// as the gradient.  Returns the gradient (N, V), each row's cross-entropy (N,) and the gradient's
// column sums (V,).  The same numbers as h @ emb.t() then softmax_xent_, to float rounding.
std::vector<torch::Tensor> tied_softmax_xent(torch::Tensor h, torch::Tensor emb, torch::Tensor bias, torch::Tensor targets,
                                             double scale) {
  check_f32(h, "tied_softmax_xent: h"), check_f32(emb, "tied_softmax_xent: emb"), check_f32(bias, "tied_softmax_xent: bias");
  check_i64(targets, "tied_softmax_xent: targets");
  TORCH_CHECK(h.dim() == 2 && emb.dim() == 2 && h.size(1) == emb.size(1) && bias.dim() == 1 && bias.size(0) == emb.size(0) &&
                  targets.size(0) == h.size(0),
              "tied_softmax_xent: h (N, d), emb (V, d), bias (V,) and targets (N,) do not match");
  const int64_t N = h.size(0), V = emb.size(0), d = h.size(1);
  check_range(targets, V, "tied_softmax_xent: a target is outside the vocabulary");
  const Packed e_t = pack_panels(emb, true);  // B = E^T: d x V
  const int64_t rows = 8, blocks = (N + rows - 1) / rows;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(blocks, 1));
  auto grad = torch::empty({N, V}, h.options()), loss = torch::empty({N}, h.options());
  auto colsums = torch::zeros({threads, V}, h.options());
  const float *H = h.data_ptr<float>(), *bs = bias.data_ptr<float>(), *panels = e_t.panels.data_ptr<float>();
  const int64_t* y = targets.data_ptr<int64_t>();
  float *G = grad.data_ptr<float>(), *out = loss.data_ptr<float>();
  const int64_t P = (V + 15) / 16, grain = (blocks + threads - 1) / threads;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    float* acc = colsums.data_ptr<float>() + (b0 / grain) * V;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * rows, m1 = std::min(N, m0 + rows);
      for (int64_t p = 0; p < P; ++p) {
        const float* bp = panels + p * d * 16;
        const int64_t nn = std::min<int64_t>(16, V - p * 16);
        rows_by_panel(H + m0 * d, d, m1 - m0, bp, d, G + m0 * V + p * 16, V, nn, false);
      }
      for (int64_t r = m0; r < m1; ++r) out[r] = softmax_xent_row(G + r * V, bs, V, y[r], static_cast<float>(scale), acc);
    }
  });
  return {grad, loss, colsums.sum(0)};
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
    TORCH_CHECK(offsets[0].item<int64_t>() == 0 && (torch::diff(offsets) > 0).all().item<bool>() &&
                    offsets[V - 1].item<int64_t>() < total,
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
  TORCH_CHECK(crow[0].item<int64_t>() == 0 && crow[Pn].item<int64_t>() == col.size(0) && (torch::diff(crow) >= 0).all().item<bool>(),
              "compose_backward: the row pointers do not span the column indices");
  check_range(col, g_emb.size(0), "compose_backward: a word index is out of range");
  auto gp = torch::zeros({Pn, d}, g_emb.options()), gpb = torch::zeros({Pn}, g_emb.options());
  const int64_t *cr = crow.data_ptr<int64_t>(), *cl = col.data_ptr<int64_t>();
  const float *v = val.data_ptr<float>(), *G = g_emb.data_ptr<float>(), *Gb = g_bias.data_ptr<float>();
  float *out = gp.data_ptr<float>(), *outb = gpb.data_ptr<float>();
  at::parallel_for(0, Pn, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      float* o = out + p * d;
      float ob = 0.0f;
      for (int64_t k = cr[p]; k < cr[p + 1]; ++k) {
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
  double total = 0.0;
  for (auto& g : grads) {
    const float* x = g.data_ptr<float>();
    total += at::parallel_reduce(0, g.numel(), 1 << 15, 0.0, [&](int64_t lo, int64_t hi, double acc) {
      constexpr int64_t n = Vec::size();
      Vec v(0.0f);
      int64_t j = lo;
      for (; j + n <= hi; j += n) { Vec y = Vec::loadu(x + j); v = at::vec::fmadd(y, y, v); }
      float part = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
      for (; j < hi; ++j) part += x[j] * x[j];
      return acc + part;
    }, std::plus<double>());
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward", &lstm_forward, "LSTM time loop with a projection, forwards");
  m.def("lstm_backward", &lstm_backward, "LSTM time loop with a projection, backwards");
  m.def("tied_softmax_xent", &tied_softmax_xent, "the tied output layer's logits and softmax cross-entropy gradient");
  m.def("compose_forward", &compose_forward, "word table from pieces and residuals");
  m.def("compose_backward", &compose_backward, "the pieces' gradient from the word table's");
  m.def("clip_sgd_", &clip_sgd_, "gradient clipping by global norm and an SGD step, in place");
}
