// BatchNorm on the CPU: host entry points of the batch_norm_* ops, registered at the CPU key. The
// shared channel passes of channel_kernels.h run with per-channel statistics (stat_stride 0); the
// per-(n, c) partial moments and gradient sums of channels-first input are merged over n in order.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "channel_kernels.h"
#include "normext/checks.h"

namespace normext::cpu {
namespace {

using at::Tensor;

// The channel passes' view of X (see BatchNormArgs::rows_view): rows give per-channel results
// directly, channels-first runs per-(n, c) ones that are merged over n.
ChannelShape bn_shape(const BatchNormArgs& a) {
  const auto [N, C, HxW] = a.dims;
  if (a.rows_view) return {1, C, N * HxW, true};
  return {N, C, HxW, false};
}

// Per-channel mean and M2 of X: per-(n, c) moments (double, see Moments) merged over n in order.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void batch_moments(const scalar_t* X, const ChannelShape& s, acc_t* mean, acc_t* m2) {
  std::vector<double> m_nc(s.N * s.C), q_nc(s.N * s.C);
  channel_moments(X, s, m_nc.data(), q_nc.data());
  at::parallel_for(0, s.C, grain_for(s.N), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Moments w{0.0, 0.0, 0.0};
      for (int64_t n = 0; n < s.N; ++n) {
        w = welford_merge(w, Moments{m_nc[n * s.C + c], q_nc[n * s.C + c], double(s.HxW)});
      }
      mean[c] = acc_t(w.mean);
      m2[c] = acc_t(w.m2);
    }
  });
}

// Sums per-(n, c) values over n in order into out[c] (a copy for one sample).
template <typename acc_t>
void sum_over_samples(const std::vector<acc_t>& v, int64_t N, int64_t C, acc_t* out) {
  at::parallel_for(0, C, grain_for(N), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t t = 0;
      for (int64_t n = 0; n < N; ++n) t += v[n * C + c];
      out[c] = t;
    }
  });
}

// running = (1 - momentum) * running + momentum * stat, computed in stat's (accumulation) type and
// written back in the running statistic's dtype and strides.
void update_running_stat(const c10::optional<Tensor>& running, const Tensor& stat, double momentum) {
  if (!running.has_value() || !running->defined()) return;
  running->copy_(running->to(stat.scalar_type()).mul(1.0 - momentum).add_(stat, momentum));
}

// The running-stat update from merged per-channel moments over `count` values: the mean and the
// unbiased variance M2 / (count - 1). An empty batch leaves the running statistics alone.
void update_running_stats(const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                          const Tensor& mean, const Tensor& m2, double count, double momentum) {
  if (count == 0) return;
  update_running_stat(running_mean, mean, momentum);
  update_running_stat(running_var, m2 / (count - 1), momentum);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_fwd_cpu(
    const Tensor& X_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    const c10::optional<Tensor>& residual, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, double momentum, double eps, int64_t act, double slope) {
  constexpr const char* op = "batch_norm_fwd";
  const auto a = check_batch_norm(X_in, gamma, beta, residual, act, op);
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
    channel_apply(X, R, Y.data_ptr<scalar_t>(), s, k, act, slope);
  });
  update_running_stats(running_mean, running_var, mean, m2, count, momentum);
  return {Y, mean, rstd};
}

std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& X_in) {
  const auto a =
      check_batch_norm(X_in, c10::nullopt, c10::nullopt, c10::nullopt, kIdentity, "batch_norm_stats");
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
    for (int64_t k = 0; k < K; ++k) total += double(n_p[k]);
    for (int64_t c = 0; c < C; ++c) {
      Welford<scalar_t, scalar_t> w{scalar_t(0), scalar_t(0), scalar_t(0)};
      for (int64_t k = 0; k < K; ++k) w = welford_merge(w, {m_p[k * C + c], q_p[k * C + c], n_p[k]});
      mean.data_ptr<scalar_t>()[c] = w.mean;
      m2.data_ptr<scalar_t>()[c] = w.m2;
    }
  });
  update_running_stats(running_mean, running_var, mean, m2, total, momentum);
  return {mean, m2 / total};
}

Tensor batch_norm_apply_cpu(const Tensor& X_in, const Tensor& mean_in, const Tensor& var_in,
                            const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
                            const c10::optional<Tensor>& residual, double eps, int64_t act, double slope) {
  constexpr const char* op = "batch_norm_apply";
  const auto a = check_batch_norm(X_in, gamma, beta, residual, act, op);
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
    channel_apply(a.X.const_data_ptr<scalar_t>(), R, Y.data_ptr<scalar_t>(), bn_shape(a), k, act, slope);
  });
  return Y;
}

std::tuple<Tensor, Tensor> batch_norm_bwd_reduce_cpu(const Tensor& dY_in, const Tensor& X_in,
                                                     const c10::optional<Tensor>& residual,
                                                     const Tensor& mean_in, const Tensor& rstd_in,
                                                     const c10::optional<Tensor>& gamma,
                                                     const c10::optional<Tensor>& beta, int64_t act,
                                                     double slope) {
  constexpr const char* op = "batch_norm_bwd_reduce";
  const auto a = check_batch_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  const Tensor dY = *check_like(dY_in, a.X, a.layout, "grad_output", op);
  const Tensor mean = check_stats(mean_in, a.X, C, "mean", op);
  const Tensor rstd = check_stats(rstd_in, a.X, C, "rstd", op);
  const auto acc_opts = a.X.options().dtype(acc_dtype(a.X));
  Tensor sum_dz = at::zeros({C}, acc_opts);
  Tensor sum_dzx = at::zeros({C}, acc_opts);
  if (a.X.numel() == 0) return {sum_dz, sum_dzx};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.X.scalar_type(), "batch_norm_bwd_reduce_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const ChannelShape s = bn_shape(a);
        std::vector<acc_t> ones, zeros;
        const ChannelCoefs<acc_t> k{mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), 0,
                                    param_or(a.gamma, ones, C, acc_t(1)),
                                    param_or(a.beta, zeros, C, acc_t(0))};
        std::vector<acc_t> sdz(s.N * C), sdzx(s.N * C);
        const scalar_t* R = a.residual ? a.residual->const_data_ptr<scalar_t>() : nullptr;
        channel_grad_sums(dY.const_data_ptr<scalar_t>(), a.X.const_data_ptr<scalar_t>(), R, s, k, act, slope,
                          sdz.data(), sdzx.data());
        sum_over_samples(sdz, s.N, C, sum_dz.data_ptr<acc_t>());
        sum_over_samples(sdzx, s.N, C, sum_dzx.data_ptr<acc_t>());
      });
  return {sum_dz, sum_dzx};
}

std::tuple<Tensor, Tensor> batch_norm_bwd_elemt_cpu(
    const Tensor& dY_in, const Tensor& X_in, const c10::optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    const c10::optional<Tensor>& sum_dz_in, const c10::optional<Tensor>& sum_dzx_in, double inv_count,
    int64_t act, double slope, std::array<bool, 2> mask) {
  constexpr const char* op = "batch_norm_bwd_elemt";
  const auto a = check_batch_norm(X_in, gamma, beta, residual, act, op);
  const int64_t C = a.dims.C;
  const Tensor dY = *check_like(dY_in, a.X, a.layout, "grad_output", op);
  const Tensor mean = check_stats(mean_in, a.X, C, "mean", op);
  const Tensor rstd = check_stats(rstd_in, a.X, C, "rstd", op);
  const bool has_sums = sum_dz_in.has_value() && sum_dz_in->defined();
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
        std::vector<acc_t> ones, zeros;
        const acc_t* gamma_p = param_or(a.gamma, ones, C, acc_t(1));
        const acc_t* rstd_p = rstd.const_data_ptr<acc_t>();
        const ChannelCoefs<acc_t> k{mean.const_data_ptr<acc_t>(), rstd_p, 0, gamma_p,
                                    param_or(a.beta, zeros, C, acc_t(0))};
        std::vector<acc_t> ca(C), cb(C, acc_t(0)), cc(C, acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          ca[c] = gamma_p[c] * rstd_p[c];
          if (has_sums) {
            cb[c] = -ca[c] * sum_dzx.const_data_ptr<acc_t>()[c] * acc_t(inv_count);
            cc[c] = -ca[c] * sum_dz.const_data_ptr<acc_t>()[c] * acc_t(inv_count);
          }
        }
        const scalar_t* R = a.residual ? a.residual->const_data_ptr<scalar_t>() : nullptr;
        channel_grad_input(dY.const_data_ptr<scalar_t>(), a.X.const_data_ptr<scalar_t>(), R, bn_shape(a), k,
                           GradCoefs<acc_t>{ca.data(), cb.data(), cc.data()}, act, slope,
                           mask[0] ? dX.data_ptr<scalar_t>() : nullptr,
                           mask[1] ? dR.data_ptr<scalar_t>() : nullptr);
      });
  return {dX, dR};
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, CPU, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_merge", &batch_norm_merge_cpu);
  m.impl("batch_norm_apply", &batch_norm_apply_cpu);
  m.impl("batch_norm_bwd_reduce", &batch_norm_bwd_reduce_cpu);
  m.impl("batch_norm_bwd_elemt", &batch_norm_bwd_elemt_cpu);
}

}  // namespace normext::cpu
