// Native CPU kernels for a local training step, each fused so that its element-wise work makes
// one pass over memory; the matrix products stay ATen's (MKL):
//   * the projected LSTM's time loop, forwards and backwards: the LSTM of Hochreiter &
//     Schmidhuber 1997 with nn.LSTM's projection, backpropagation through time (Werbos 1990);
//   * the softmax cross-entropy and its gradient (softmax - onehot) / N (Bishop 2006, "Pattern
//     Recognition and Machine Learning", sec. 4.3.4), row by row in cache;
//   * the subword composition of the word table (mean of a word's pieces, Bojanowski et al.
//     2017) and its backward.
// Loaded (compiled on first use) by models/native.py; models/fused.py runs its PyTorch version
// of each where they are not loaded.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
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
  const auto w_hh_t = w_hh.t(), w_hr_t = w_hr.t();
  for (int64_t t = 0; t < T; ++t) {
    auto a = gates[t];
    a.addmm_(hs[t], w_hh_t);
    cell_forward(a.data_ptr<float>(), cs[t].data_ptr<float>(), cs[t + 1].data_ptr<float>(), tcs[t].data_ptr<float>(),
                 hfs[t].data_ptr<float>(), B, H);
    auto h = hs[t + 1];
    at::mm_out(h, hfs[t], w_hr_t);
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
  for (int64_t t = T - 1; t >= 0; --t) {
    auto dh_t = g_hs[t];
    dh_t.add_(dh);
    at::mm_out(dhf, dh_t, w_hr);
    cell_backward(acts[t].data_ptr<float>(), cs[t].data_ptr<float>(), tcs[t].data_ptr<float>(), dhf.data_ptr<float>(),
                  dc.data_ptr<float>(), d_gates[t].data_ptr<float>(), B, H);
    at::mm_out(dh, d_gates[t], w_hh);
  }
  return {d_gates, dh, dc};
}

// logits (N, V): h E^T without the bias.  In place, they become the gradient of the summed
// cross-entropy times `scale`: (softmax(logits + bias) - onehot(targets)) * scale.  Returns each
// row's cross-entropy (N,) and the gradient's column sums (V,), the bias's gradient.  A row at a
// time, so its passes (bias and max, exp and sum, scale) run in cache.
std::vector<torch::Tensor> softmax_xent_(torch::Tensor logits, torch::Tensor bias, torch::Tensor targets, double scale) {
  check_f32(logits, "softmax_xent_: logits"), check_f32(bias, "softmax_xent_: bias"), check_i64(targets, "softmax_xent_: targets");
  TORCH_CHECK(logits.dim() == 2 && bias.dim() == 1 && bias.size(0) == logits.size(1) && targets.size(0) == logits.size(0),
              "softmax_xent_: logits (N, V), bias (V,) and targets (N,) do not match");
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N > 0) {
    const auto [lo, hi] = torch::aminmax(targets);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < V, "softmax_xent_: a target is outside the vocabulary");
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(N, 1));
  auto loss = torch::empty({N}, logits.options());
  auto colsums = torch::zeros({threads, V}, logits.options());
  float* L = logits.data_ptr<float>();
  const float* bs = bias.data_ptr<float>();
  const int64_t* y = targets.data_ptr<int64_t>();
  float* out = loss.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t grain = (N + threads - 1) / threads;  // one block of rows per thread, one column sum each
  at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) {
    constexpr int64_t n = Vec::size();
    float* acc = colsums.data_ptr<float>() + (lo / grain) * V;
    for (int64_t r = lo; r < hi; ++r) {
      float* row = L + r * V;
      Vec vmax(-std::numeric_limits<float>::infinity());
      int64_t j = 0;
      for (; j + n <= V; j += n) {
        Vec x = Vec::loadu(row + j) + Vec::loadu(bs + j);
        x.store(row + j);
        vmax = at::vec::maximum(vmax, x);
      }
      float top = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
      for (; j < V; ++j) top = std::max(top, row[j] += bs[j]);
      const float picked = row[y[r]];
      Vec vsum(0.0f), vtop(top);
      for (j = 0; j + n <= V; j += n) {
        Vec e = (Vec::loadu(row + j) - vtop).exp_u20();
        e.store(row + j);
        vsum = vsum + e;
      }
      float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
      for (; j < V; ++j) total += (row[j] = std::exp(row[j] - top));
      const float k = s / total;
      row[y[r]] -= total;  // (e - total) * k = (p - 1) * scale at the target
      const Vec vk(k);
      for (j = 0; j + n <= V; j += n) {
        Vec gr = Vec::loadu(row + j) * vk;
        gr.store(row + j);
        (Vec::loadu(acc + j) + gr).store(acc + j);
      }
      for (; j < V; ++j) acc[j] += (row[j] *= k);
      out[r] = top + std::log(total) - picked;
    }
  });
  return {loss, colsums.sum(0)};
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
    const auto [lo, hi] = torch::aminmax(pieces);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < piece_emb.size(0), "compose_forward: a piece id is out of range");
  }
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
  if (col.size(0) > 0) {
    const auto [lo, hi] = torch::aminmax(col);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < g_emb.size(0) && crow[Pn].item<int64_t>() == col.size(0),
                "compose_backward: a word index is out of range");
  }
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward", &lstm_forward, "LSTM time loop with a projection, forwards");
  m.def("lstm_backward", &lstm_backward, "LSTM time loop with a projection, backwards");
  m.def("softmax_xent_", &softmax_xent_, "softmax cross-entropy, its gradient in place");
  m.def("compose_forward", &compose_forward, "word table from pieces and residuals");
  m.def("compose_backward", &compose_backward, "the pieces' gradient from the word table's");
}
