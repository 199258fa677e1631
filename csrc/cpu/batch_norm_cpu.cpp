// BatchNorm on the CPU: host entry points of the batch_norm_* ops, registered at the CPU key. The
// shared channel passes of channel_kernels.h run with per-channel statistics (stat_stride 0); the
// per-(n, c) partial moments and gradient sums of channels-first input are merged over n in order.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "channel_kernels.h"
#include "normext/checks.h"

namespace normext::cpu::CPU_CAPABILITY {
namespace {

using at::Tensor;

// The channel passes' view of X (see ChannelNormArgs::rows): rows give per-channel results
// directly, channels-first runs per-(n, c) ones that are merged over n.
ChannelShape bn_shape(const ChannelNormArgs& a) {
  const auto [N, C, HxW] = a.dims;
  if (a.rows) return {1, C, N * HxW, true};
  return {N, C, HxW, false};
}

// ---------------------------------------------------------------- rows view (channels-last, (N, C))
// Column passes over M rows of C channels on the row walkers of channel_kernels.h (for_rows).

// out[c] += Σ_rows F::f(x, k[c]).
template <typename F>
struct SumStep {
  template <typename T, typename Rows, typename scalar_t, typename acc_t>
  static void run(int64_t o, int64_t j, Rows rows, int64_t C, const scalar_t* X, const acc_t* k, acc_t* out) {
    const T kv = coef<T>(k, j);
    T acc = coef<T>(out, j);
    for (int64_t q = 0; q < rows; ++q, o += C) acc = acc + F::f(load_as<scalar_t, T>(X + o), kv);
    store_as<acc_t, T>(out + j, acc);
  }
};

struct ShiftedValue {
  template <typename T>
  static T f(const T& v, const T& k) {
    return v - k;
  }
};

struct SquaredDeviation {
  template <typename T>
  static T f(const T& v, const T& m) {
    return (v - m) * (v - m);
  }
};

// Per-channel Σ F::f(x, k[c]) over all M rows: fixed row chunks (RowChunks) reduced in parallel, the
// chunk sums added in double in chunk order.
template <typename F, typename scalar_t, typename acc_t>
std::vector<double> rows_sum(const scalar_t* X, int64_t M, int64_t C, const acc_t* k) {
  const RowChunks rc = row_chunks(M, C);
  std::vector<acc_t> part(rc.count * C, acc_t(0));
  at::parallel_for(0, rc.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = i * rc.rows_per_chunk, r1 = std::min(M, r0 + rc.rows_per_chunk);
      for_rows<scalar_t, SumStep<F>>(r0, r1, C, X, k, part.data() + i * C);
    }
  });
  std::vector<double> total(C, 0.0);
  for (int64_t i = 0; i < rc.count; ++i) {
    for (int64_t c = 0; c < C; ++c) total[c] += double(part[i * C + c]);
  }
  return total;
}

// Per-channel mean and M2, an exact two-pass: pass 1 sums x - K (K the first row, so float sums
// scale with the spread, not the magnitude), pass 2 sums (x - mean)^2.
template <typename scalar_t, typename acc_t>
void rows_moments(const scalar_t* X, int64_t M, int64_t C, acc_t* mean, acc_t* m2) {
  const std::vector<acc_t> k(X, X + C);
  const auto shifted = rows_sum<ShiftedValue>(X, M, C, k.data());
  std::vector<double> mean_d(C);
  for (int64_t c = 0; c < C; ++c) {
    mean_d[c] = double(k[c]) + shifted[c] / double(M);
    mean[c] = acc_t(mean_d[c]);
  }
  const auto sq = rows_sum<SquaredDeviation>(X, M, C, mean);
  for (int64_t c = 0; c < C; ++c) {
    // Σ(x - m)^2 = M2 + M·(mean - m)^2 for the rounded mean m.
    const double e = mean_d[c] - double(mean[c]);
    m2[c] = acc_t(std::max(0.0, sq[c] - double(M) * e * e));
  }
}

// Runs body(r0, r1) over row ranges of about 32k elements in parallel.
template <typename F>
void parallel_rows(int64_t M, int64_t C, const F& body) {
  at::parallel_for(0, M, grain_for(C), body);
}

// ------------------------------------------------------------------------- both views

// Per-channel mean and M2 of X. Planes: per-(n, c) moments (double, see Moments) merged over n.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void batch_moments(const scalar_t* X, const ChannelShape& s, acc_t* mean, acc_t* m2) {
  if (s.channels_last) {
    rows_moments(X, s.HxW, s.C, mean, m2);
    return;
  }
  std::vector<double> m_nc(s.N * s.C), q_nc(s.N * s.C);
  channel_moments(X, s, m_nc.data(), q_nc.data());
  at::parallel_for(0, s.C, grain_for(s.N), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Moments w = merge_equal_parts(m_nc.data() + c, q_nc.data() + c, s.N, s.C, double(s.HxW));
      mean[c] = acc_t(w.mean);
      m2[c] = acc_t(w.m2);
    }
  });
}

// Y = act(x̂·gamma + beta + R) with per-channel statistics.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void batch_apply(const scalar_t* X, const scalar_t* R, scalar_t* Y, const ChannelShape& s,
                 const ChannelCoefs<acc_t>& k, int64_t act, double slope) {
  if (!s.channels_last) {
    channel_apply(X, R, Y, s, k, act, slope);
    return;
  }
  std::vector<acc_t> scale(s.C);
  for (int64_t c = 0; c < s.C; ++c) scale[c] = k.gamma[c] * k.rstd[c];
  dispatch_activation(act, [&](auto A) {
    parallel_rows(s.HxW, s.C, [&](int64_t r0, int64_t r1) {
      for_rows<scalar_t, ApplyStep<decltype(A)::value>>(
          r0, r1, s.C, X, R, Y, k.mean, static_cast<const acc_t*>(scale.data()), k.beta, acc_t(slope));
    });
  });
}

// Per-channel Σdz and Σdz·x̂ in a fixed order (planes: per-(n, c) sums added over n in order).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void batch_grad_sums(const scalar_t* dY, const scalar_t* X, const scalar_t* R, const ChannelShape& s,
                     const ChannelCoefs<acc_t>& k, int64_t act, double slope, acc_t* sum_dz, acc_t* sum_dzx) {
  if (!s.channels_last) {
    std::vector<acc_t> sdz(s.N * s.C), sdzx(s.N * s.C);
    channel_grad_sums(dY, X, R, s, k, act, slope, sdz.data(), sdzx.data());
    for (int64_t c = 0; c < s.C; ++c) {
      acc_t a = 0, b = 0;
      for (int64_t n = 0; n < s.N; ++n) {
        a += sdz[n * s.C + c];
        b += sdzx[n * s.C + c];
      }
      sum_dz[c] = a;
      sum_dzx[c] = b;
    }
    return;
  }
  std::vector<double> a(s.C), b(s.C);
  dispatch_grad_activation(act, [&](auto A) {
    reduce_channels_last<acc_t>(
        s, a.data(), b.data(), [&](int64_t, int64_t r0, int64_t r1, acc_t* cdz, acc_t* cdzx) {
          for_rows<scalar_t, GradSumsStep<decltype(A)::value>>(r0, r1, s.C, dY, X, R, k.mean, k.rstd, k.gamma,
                                                               k.beta, acc_t(slope), cdz, cdzx);
        });
  });
  std::copy(a.begin(), a.end(), sum_dz);
  std::copy(b.begin(), b.end(), sum_dzx);
}

// Channel c's dx = ca·dz + cb·x̂ + cc: ca = γ·rstd and, with batch statistics (the sums Σdz, Σdz·x̂ given),
// cb = −ca·Σdz·x̂ / count, cc = −ca·Σdz / count; without them (constant statistics) cb = cc = 0.
template <typename acc_t>
std::tuple<acc_t, acc_t, acc_t> grad_coef(int64_t c, const acc_t* gamma, const acc_t* rstd,
                                          const acc_t* sum_dz, const acc_t* sum_dzx, acc_t inv_count) {
  const acc_t ca = gamma[c] * rstd[c];
  if (sum_dz == nullptr) return {ca, acc_t(0), acc_t(0)};
  return {ca, -ca * sum_dzx[c] * inv_count, -ca * sum_dz[c] * inv_count};
}

// dX = ca·dz + cb·x̂ + cc (grad_coef) and dR = dz; either output may be null.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void batch_grad_input(const scalar_t* dY, const scalar_t* X, const scalar_t* R, const ChannelShape& s,
                      const ChannelCoefs<acc_t>& k, const acc_t* rstd, const acc_t* sum_dz,
                      const acc_t* sum_dzx, acc_t inv_count, int64_t act, double slope, scalar_t* dX,
                      scalar_t* dR) {
  std::vector<acc_t> ca(s.C), cb(s.C), cc(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    std::tie(ca[c], cb[c], cc[c]) = grad_coef(c, k.gamma, rstd, sum_dz, sum_dzx, inv_count);
  }
  const GradCoefs<acc_t> gc{ca.data(), cb.data(), cc.data()};
  if (!s.channels_last) {
    channel_grad_input(dY, X, R, s, k, gc, act, slope, dX, dR);
    return;
  }
  dispatch_grad_activation(act, [&](auto A) {
    parallel_rows(s.HxW, s.C, [&](int64_t r0, int64_t r1) {
      for_rows<scalar_t, GradInputStep<decltype(A)::value>>(r0, r1, s.C, dY, X, R, k.mean, k.rstd, k.gamma,
                                                            k.beta, gc.a, gc.b, gc.c, acc_t(slope), dX, dR);
    });
  });
}

// running = (1 - momentum)·running + momentum·stat(c), computed in acc_t and written back in the running
// statistic's dtype and stride: one loop, where tensor ops cost several allocations and dispatches per call
// (tens of µs, as much as the whole forward of a small batch).
template <typename acc_t, typename Stat>
void update_running_stat(const c10::optional<Tensor>& running, double momentum, int64_t C, const Stat& stat) {
  if (!running.has_value() || !running->defined()) return;
  const acc_t keep = acc_t(1.0 - momentum), take = acc_t(momentum);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running->scalar_type(), "update_running_stat",
                                  [&] {
                                    scalar_t* r = running->data_ptr<scalar_t>();
                                    const int64_t st = running->stride(0);
                                    for (int64_t c = 0; c < C; ++c)
                                      r[c * st] = scalar_t(acc_t(r[c * st]) * keep + take * stat(c));
                                  });
}

// The running-stat update from merged per-channel moments over `count` values: the mean and the
// unbiased variance M2 / (count - 1). An empty batch leaves the running statistics alone.
void update_running_stats(const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                          const Tensor& mean, const Tensor& m2, double count, double momentum) {
  if (count == 0) return;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "update_running_stats", [&] {
    const scalar_t* m = mean.const_data_ptr<scalar_t>();
    const scalar_t* q = m2.const_data_ptr<scalar_t>();
    const scalar_t unbiased = scalar_t(count - 1);
    const int64_t C = mean.numel();
    update_running_stat<scalar_t>(running_mean, momentum, C, [&](int64_t c) { return m[c]; });
    update_running_stat<scalar_t>(running_var, momentum, C, [&](int64_t c) { return q[c] / unbiased; });
  });
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_fwd_cpu(
    const Tensor& X_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    const c10::optional<Tensor>& residual, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, double momentum, double eps, int64_t act, double slope) {
  constexpr const char* op = "batch_norm_fwd";
  const auto a = check_channel_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  check_running_stats(running_mean, running_var, a.X, C, op);
  Tensor Y = at::empty_like(a.X);
  const auto acc_opts = a.X.options().dtype(acc_dtype(a.X));
  Tensor mean = at::empty({C}, acc_opts);
  Tensor rstd = at::empty({C}, acc_opts);
  if (a.X.numel() == 0) {
    mean.fill_(std::nan(""));
    rstd.fill_(std::nan(""));
    return {Y, mean, rstd};
  }
  const double count = double(a.X.numel() / C);
  Tensor m2 = at::empty({C}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "batch_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelShape s = bn_shape(a);
    const scalar_t* X = a.X.const_data_ptr<scalar_t>();
    acc_t* mean_p = mean.data_ptr<acc_t>();
    acc_t* m2_p = m2.data_ptr<acc_t>();
    acc_t* rstd_p = rstd.data_ptr<acc_t>();
    batch_moments(X, s, mean_p, m2_p);
    for (int64_t c = 0; c < C; ++c) rstd_p[c] = acc_t(1) / std::sqrt(m2_p[c] / acc_t(count) + acc_t(eps));
    std::vector<acc_t> ones, zeros;
    const ChannelCoefs<acc_t> k{mean_p, rstd_p, 0, param_or(a.gamma, ones, C, acc_t(1)),
                                param_or(a.beta, zeros, C, acc_t(0))};
    const scalar_t* R = a.residual ? a.residual->const_data_ptr<scalar_t>() : nullptr;
    batch_apply(X, R, Y.data_ptr<scalar_t>(), s, k, act, slope);
  });
  update_running_stats(running_mean, running_var, mean, m2, count, momentum);
  return {Y, mean, rstd};
}

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& X_in) {
  const auto a =
      check_channel_norm(X_in, c10::nullopt, c10::nullopt, c10::nullopt, kIdentity, "batch_norm_stats");
  const auto acc_opts = a.X.options().dtype(acc_dtype(a.X));
  Tensor mean = at::zeros({a.dims.C}, acc_opts);
  Tensor m2 = at::zeros({a.dims.C}, acc_opts);
  if (a.X.numel() == 0) return {mean, m2};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    batch_moments(a.X.const_data_ptr<scalar_t>(), bn_shape(a), mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>());
  });
  return {mean, m2};
}

std::tuple<Tensor, Tensor> batch_norm_merge_cpu(const Tensor& counts_in, const Tensor& means_in,
                                                const Tensor& m2s_in,
                                                const c10::optional<Tensor>& running_mean,
                                                const c10::optional<Tensor>& running_var, double momentum,
                                                double eps) {
  constexpr const char* op = "batch_norm_merge";
  TORCH_CHECK(means_in.dim() == 2 && m2s_in.sizes() == means_in.sizes(), op,
              ": expected means and m2s of the same shape (K, C), got ", means_in.sizes(), " and ",
              m2s_in.sizes());
  const int64_t K = means_in.size(0), C = means_in.size(1);
  TORCH_CHECK(means_in.scalar_type() == at::kFloat || means_in.scalar_type() == at::kDouble, op,
              ": expected float32 or float64 statistics, got ", means_in.scalar_type());
  const Tensor means = check_stats(means_in, means_in, K * C, "means", op);
  const Tensor m2s = check_stats(m2s_in, means_in, K * C, "m2s", op);
  const Tensor counts = check_stats(counts_in, means_in, K, "counts", op);
  check_running_stats(running_mean, running_var, means, C, op);
  Tensor mean = at::empty({C}, means.options());
  Tensor m2 = at::empty({C}, means.options());
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "batch_norm_merge_cpu", [&] {
    const scalar_t* n_p = counts.const_data_ptr<scalar_t>();
    const scalar_t* m_p = means.const_data_ptr<scalar_t>();
    const scalar_t* q_p = m2s.const_data_ptr<scalar_t>();
    scalar_t* mean_p = mean.data_ptr<scalar_t>();
    scalar_t* m2_p = m2.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) total += double(n_p[k]);
    for (int64_t c = 0; c < C; ++c) {
      Moments w{0.0, 0.0, 0.0};
      for (int64_t k = 0; k < K; ++k) {
        w = welford_merge(w, Moments{double(m_p[k * C + c]), double(q_p[k * C + c]), double(n_p[k])});
      }
      mean_p[c] = scalar_t(w.mean);
      m2_p[c] = scalar_t(w.m2);
    }
  });
  update_running_stats(running_mean, running_var, mean, m2, total, momentum);
  return {mean, m2 / total};
}

Tensor batch_norm_apply_cpu(const Tensor& X_in, const Tensor& mean_in, const Tensor& var_in,
                            const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
                            const c10::optional<Tensor>& residual, double eps, int64_t act, double slope) {
  constexpr const char* op = "batch_norm_apply";
  const auto a = check_channel_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  const Tensor mean = *check_param(mean_in, a.X, C, "mean", op);
  const Tensor rstd = (*check_param(var_in, a.X, C, "var", op) + eps).rsqrt();
  Tensor Y = at::empty_like(a.X);
  if (a.X.numel() == 0) return Y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "batch_norm_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> ones, zeros;
    const ChannelCoefs<acc_t> k{mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), 0,
                                param_or(a.gamma, ones, C, acc_t(1)), param_or(a.beta, zeros, C, acc_t(0))};
    const scalar_t* R = a.residual ? a.residual->const_data_ptr<scalar_t>() : nullptr;
    batch_apply(a.X.const_data_ptr<scalar_t>(), R, Y.data_ptr<scalar_t>(), bn_shape(a), k, act, slope);
  });
  return Y;
}

// The checked inputs of a backward op: X (with its layout and parameters), dY like X, per-channel mean and
// rstd.
struct BackwardArgs {
  ChannelNormArgs a;
  Tensor dY, mean, rstd;
};

// needs_xhat as for check_grad_activation.
BackwardArgs check_backward(const Tensor& dY, const Tensor& X, const c10::optional<Tensor>& gamma,
                            const c10::optional<Tensor>& beta, const c10::optional<Tensor>& residual,
                            const Tensor& mean, const Tensor& rstd, int64_t act, bool needs_xhat,
                            const char* op) {
  BackwardArgs b{
      check_channel_norm(X, gamma, beta, residual, check_grad_activation(act, op, needs_xhat), op)};
  const int64_t C = b.a.dims.C;
  b.dY = *check_like(dY, b.a.X, b.a.layout, "grad_output", op);
  b.mean = check_stats(mean, b.a.X, C, "mean", op);
  b.rstd = check_stats(rstd, b.a.X, C, "rstd", op);
  return b;
}

// A backward op's per-channel coefficients: x̂ = (v − m)·p as xhat_coefs gives them, gamma and beta (1 and 0
// when absent); `store` holds those that are not the tensors' own data.
template <typename acc_t>
ChannelCoefs<acc_t> backward_coefs(const BackwardArgs& b, int64_t act,
                                   std::array<std::vector<acc_t>, 3>& store) {
  const int64_t C = b.a.dims.C;
  const acc_t* gamma = param_or(b.a.gamma, store[0], C, acc_t(1));
  const acc_t* beta = param_or(b.a.beta, store[1], C, acc_t(0));
  const auto [m, p] = xhat_coefs(act, b.mean.const_data_ptr<acc_t>(), b.rstd.const_data_ptr<acc_t>(), C, C,
                                 gamma, beta, store[2]);
  return {m, p, 0, gamma, beta};
}

std::tuple<Tensor, Tensor> batch_norm_bwd_reduce_cpu(const Tensor& dY_in, const Tensor& X_in,
                                                     const c10::optional<Tensor>& residual,
                                                     const Tensor& mean_in, const Tensor& rstd_in,
                                                     const c10::optional<Tensor>& gamma,
                                                     const c10::optional<Tensor>& beta, int64_t act,
                                                     double slope) {
  const BackwardArgs b = check_backward(dY_in, X_in, gamma, beta, residual, mean_in, rstd_in, act, true,
                                        "batch_norm_bwd_reduce");
  const auto& a = b.a;
  const int64_t C = a.dims.C;
  const auto acc_opts = a.X.options().dtype(acc_dtype(a.X));
  Tensor sum_dz = at::zeros({C}, acc_opts);
  Tensor sum_dzx = at::zeros({C}, acc_opts);
  if (a.X.numel() == 0) return {sum_dz, sum_dzx};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.X.scalar_type(), "batch_norm_bwd_reduce_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        std::array<std::vector<acc_t>, 3> store;
        const ChannelCoefs<acc_t> k = backward_coefs(b, act, store);
        const scalar_t* R = a.residual ? a.residual->const_data_ptr<scalar_t>() : nullptr;
        batch_grad_sums(b.dY.const_data_ptr<scalar_t>(), a.X.const_data_ptr<scalar_t>(), R, bn_shape(a), k,
                        act, slope, sum_dz.data_ptr<acc_t>(), sum_dzx.data_ptr<acc_t>());
      });
  return {sum_dz, sum_dzx};
}

std::tuple<Tensor, Tensor> batch_norm_bwd_elemt_cpu(
    const Tensor& dY_in, const Tensor& X_in, const c10::optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    const c10::optional<Tensor>& sum_dz_in, const c10::optional<Tensor>& sum_dzx_in, double inv_count,
    int64_t act, double slope, std::array<bool, 2> mask) {
  constexpr const char* op = "batch_norm_bwd_elemt";
  const bool has_sums = sum_dz_in.has_value() && sum_dz_in->defined();
  const BackwardArgs b =
      check_backward(dY_in, X_in, gamma, beta, residual, mean_in, rstd_in, act, has_sums, op);
  const auto& a = b.a;
  const int64_t C = a.dims.C;
  TORCH_CHECK(has_sums == (sum_dzx_in.has_value() && sum_dzx_in->defined()), op,
              ": sum_dz and sum_dzxhat must be given together");
  const Tensor sum_dz = has_sums ? check_stats(*sum_dz_in, a.X, C, "sum_dz", op) : Tensor();
  const Tensor sum_dzx = has_sums ? check_stats(*sum_dzx_in, a.X, C, "sum_dzxhat", op) : Tensor();
  Tensor dX = mask[0] ? at::empty_like(a.X) : at::empty({0}, a.X.options());
  Tensor dR = mask[1] ? at::empty_like(a.X) : at::empty({0}, a.X.options());
  if (a.X.numel() == 0 || (!mask[0] && !mask[1])) return {dX, dR};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.X.scalar_type(), "batch_norm_bwd_elemt_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        std::array<std::vector<acc_t>, 3> store;
        const ChannelCoefs<acc_t> k = backward_coefs(b, act, store);
        // Tensor::data_ptr checks the tensor on every call: taken once, not per channel.
        const acc_t* sdz_p = has_sums ? sum_dz.const_data_ptr<acc_t>() : nullptr;
        const acc_t* sdzx_p = has_sums ? sum_dzx.const_data_ptr<acc_t>() : nullptr;
        const scalar_t* R = a.residual ? a.residual->const_data_ptr<scalar_t>() : nullptr;
        batch_grad_input(b.dY.const_data_ptr<scalar_t>(), a.X.const_data_ptr<scalar_t>(), R, bn_shape(a), k,
                         b.rstd.const_data_ptr<acc_t>(), sdz_p, sdzx_p, acc_t(inv_count), act, slope,
                         mask[0] ? dX.data_ptr<scalar_t>() : nullptr,
                         mask[1] ? dR.data_ptr<scalar_t>() : nullptr);
      });
  return {dX, dR};
}

// Channels-first training backward, one channel a task: its N runs' Σdz, Σdz·x̂ (added over n in order,
// as batch_grad_sums does), then its dx while its x and dy are still in cache; behind an activation the
// first pass keeps dz (float) for the second. The results are those of batch_grad_sums + batch_grad_input.
template <typename scalar_t, int64_t kAct, typename acc_t = at::opmath_type<scalar_t>>
void batch_grad_by_channel(const scalar_t* dY, const scalar_t* X, const scalar_t* R, const ChannelShape& s,
                           const ChannelCoefs<acc_t>& k, const acc_t* rstd, double slope, acc_t* sum_dz,
                           acc_t* sum_dzx, scalar_t* dX, scalar_t* dR) {
  const acc_t sl = acc_t(slope), inv_count = acc_t(1.0 / double(s.N * s.HxW));
  const bool need_input = dX != nullptr || dR != nullptr;
  const bool keep_dz = base_activation(kAct) != kIdentity && need_input;
  at::parallel_for(0, s.C, grain_for(s.N * s.HxW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dz(keep_dz ? s.N * s.HxW : 0);
    for (int64_t c = begin; c < end; ++c) {
      acc_t a = 0, b = 0;
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t o = (n * s.C + c) * s.HxW;
        const auto [p, q] = grad_sums_run<scalar_t, kAct>(dY + o, X + o, R ? R + o : nullptr, s.HxW,
                                                          k.mean[c], k.rstd[c], k.gamma[c], k.beta[c], sl,
                                                          keep_dz ? dz.data() + n * s.HxW : nullptr);
        a += p;
        b += q;
      }
      sum_dz[c] = a;
      sum_dzx[c] = b;
      if (!need_input) continue;
      const auto [ca, cb, cc] = grad_coef(c, k.gamma, rstd, sum_dz, sum_dzx, inv_count);
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t o = (n * s.C + c) * s.HxW;
        scalar_t* dx = dX ? dX + o : nullptr;
        scalar_t* dr = dR ? dR + o : nullptr;
        if (keep_dz) {
          grad_input_from_dz_run<scalar_t, kAct>(dz.data() + n * s.HxW, X + o, R ? R + o : nullptr, dx, dr,
                                                 s.HxW, k.mean[c], k.rstd[c], ca, cb, cc, sl);
        } else {
          grad_input_run<scalar_t, kAct>(dY + o, X + o, R ? R + o : nullptr, dx, dr, s.HxW, k.mean[c],
                                         k.rstd[c], k.gamma[c], k.beta[c], ca, cb, cc, sl);
        }
      }
    }
  });
}

// The training backward in one call: what batch_norm_bwd_reduce then batch_norm_bwd_elemt give (SyncBatchNorm
// runs those two with an all-reduce between them), with one op's fixed costs and, channels-first, one pass
// per channel over data in cache (batch_grad_by_channel).
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_bwd_cpu(const Tensor& dY_in, const Tensor& X_in,
                                                              const c10::optional<Tensor>& residual,
                                                              const Tensor& mean_in, const Tensor& rstd_in,
                                                              const c10::optional<Tensor>& gamma,
                                                              const c10::optional<Tensor>& beta, int64_t act,
                                                              double slope, std::array<bool, 4> mask) {
  const BackwardArgs b =
      check_backward(dY_in, X_in, gamma, beta, residual, mean_in, rstd_in, act, true, "batch_norm_bwd");
  const auto& a = b.a;
  const int64_t C = a.dims.C;
  const auto acc_opts = a.X.options().dtype(acc_dtype(a.X));
  Tensor dX = mask[0] ? at::empty_like(a.X) : at::empty({0}, a.X.options());
  Tensor dgamma = at::empty({mask[1] ? C : 0}, acc_opts);
  Tensor dbeta = at::empty({mask[2] ? C : 0}, acc_opts);
  Tensor dR = mask[3] ? at::empty_like(a.X) : at::empty({0}, a.X.options());
  if (a.X.numel() == 0) {
    dgamma.zero_();
    dbeta.zero_();
    return {dX, dgamma, dbeta, dR};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "batch_norm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelShape s = bn_shape(a);
    std::array<std::vector<acc_t>, 3> store;
    const ChannelCoefs<acc_t> k = backward_coefs(b, act, store);
    const acc_t* rstd_p = b.rstd.const_data_ptr<acc_t>();
    // The sums land in dgamma / dbeta where those are asked for.
    std::vector<acc_t> sdz_own(mask[2] ? 0 : C), sdzx_own(mask[1] ? 0 : C);
    acc_t* sdz = mask[2] ? dbeta.data_ptr<acc_t>() : sdz_own.data();
    acc_t* sdzx = mask[1] ? dgamma.data_ptr<acc_t>() : sdzx_own.data();
    const scalar_t* X = a.X.const_data_ptr<scalar_t>();
    const scalar_t* dYp = b.dY.const_data_ptr<scalar_t>();
    const scalar_t* R = a.residual ? a.residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dXp = mask[0] ? dX.data_ptr<scalar_t>() : nullptr;
    scalar_t* dRp = mask[3] ? dR.data_ptr<scalar_t>() : nullptr;
    // One channel a task leaves threads idle when there are fewer channels than threads to share (unless the
    // whole tensor is one task's worth anyway).
    if (!s.channels_last && (C >= 2 * at::get_num_threads() || grain_for(s.N * s.HxW) >= C)) {
      dispatch_grad_activation(act, [&](auto A) {
        batch_grad_by_channel<scalar_t, decltype(A)::value>(dYp, X, R, s, k, rstd_p, slope, sdz, sdzx, dXp,
                                                            dRp);
      });
    } else {
      batch_grad_sums(dYp, X, R, s, k, act, slope, sdz, sdzx);
      if (dXp != nullptr || dRp != nullptr) {
        batch_grad_input(dYp, X, R, s, k, rstd_p, static_cast<const acc_t*>(sdz),
                         static_cast<const acc_t*>(sdzx), acc_t(1.0 / double(s.N * s.HxW)), act, slope, dXp,
                         dRp);
      }
    }
  });
  return {dX, dgamma, dbeta, dR};
}

}  // namespace

// Called by csrc/cpu/dispatch.cpp when this capability's build is the one in use.
void register_batch_norm(torch::Library& m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_merge", &batch_norm_merge_cpu);
  m.impl("batch_norm_apply", &batch_norm_apply_cpu);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce_cpu);
  m.impl("batch_norm_bwd_elemt", &batch_norm_bwd_elemt_cpu);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
}

}  // namespace normext::cpu::CPU_CAPABILITY
