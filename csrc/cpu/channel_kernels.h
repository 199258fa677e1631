// CPU passes shared by every norm whose statistics are per (sample, channel) or per channel
// (GroupNorm, InstanceNorm, BatchNorm): per-(n,c) moments, the normalize+affine+activation apply,
// the backward per-(n,c) sums and the backward elementwise pass. Both layouts are native:
// channels-first walks contiguous HxW runs of one channel, channels-last walks runs of C channels.
#pragma once

#include <vector>

#include "cpu_utils.h"

namespace normext::cpu {

struct ChannelShape {
  int64_t N, C, HxW;
  bool channels_last;
};

// Statistics and parameters of channel (n, c): x̂ = (x - mean)·rstd, z = x̂·gamma + beta + residual.
// mean/rstd (and the backward a/b/c) are indexed [n * stat_stride + c]: stat_stride = C for
// per-sample statistics, 0 for BatchNorm's per-channel ones. gamma/beta are per channel, never null.
template <typename acc_t>
struct ChannelCoefs {
  const acc_t* mean;
  const acc_t* rstd;
  int64_t stat_stride;
  const acc_t* gamma;
  const acc_t* beta;
};

// Backward elementwise coefficients, indexed like mean/rstd: dx = a·dz + b·x̂ + c.
template <typename acc_t>
struct GradCoefs {
  const acc_t* a;
  const acc_t* b;
  const acc_t* c;
};

template <typename T, typename acc_t>
inline T grad_at_pre_activation(T dy, T z, int64_t act, acc_t slope) {
  return act == kIdentity ? dy : dy * act_grad(z, act, slope);
}

// One run of elements that share a sample n: a whole HxW run of channel c (channels-first), or the
// C channels of one spatial position (channels-last).
struct Run {
  int64_t offset;  // element offset of the run in X
  int64_t count;   // elements in the run
  int64_t stat;    // index of the run's first channel in mean/rstd
  int64_t chan;    // channel of the run's first element
  bool channel_per_element;
};

// Calls body(run) for every run of X, in parallel.
template <typename Body>
void for_each_run(const ChannelShape& s, int64_t stat_stride, const Body& body) {
  if (!s.channels_last) {
    at::parallel_for(0, s.N * s.C, grain_for(s.HxW), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t n = nc / s.C, c = nc % s.C;
        body(Run{nc * s.HxW, s.HxW, n * stat_stride + c, c, false});
      }
    });
  } else {
    at::parallel_for(0, s.N * s.HxW, grain_for(s.C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        body(Run{row * s.C, s.C, (row / s.HxW) * stat_stride, 0, true});
      }
    });
  }
}

// Per-channel value p[i] for element j of a run, as a T (a SIMD vector of consecutive channels when
// each element is its own channel, a broadcast otherwise).
template <typename T, typename acc_t>
inline T load_coef(const acc_t* p, int64_t i, int64_t j, bool channel_per_element) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return channel_per_element ? p[i + j] : p[i];
  } else {
    return channel_per_element ? T::loadu(p + i + j) : T(p[i]);
  }
}

// Calls f(T zero, j, mean, rstd, gamma, beta) for the SIMD body (T = Vectorized) and the tail
// (T = acc_t) of a run; j is the element's index within the run.
template <typename scalar_t, typename F>
inline void for_each_element(const Run& r, const ChannelCoefs<at::opmath_type<scalar_t>>& k, const F& f) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const bool pe = r.channel_per_element;
  int64_t j = 0;
  for (; j + IO::kSize <= r.count; j += IO::kSize) {
    f(Vec(acc_t(0)), j, load_coef<Vec>(k.mean, r.stat, j, pe), load_coef<Vec>(k.rstd, r.stat, j, pe),
      load_coef<Vec>(k.gamma, r.chan, j, pe), load_coef<Vec>(k.beta, r.chan, j, pe));
  }
  for (; j < r.count; ++j) {
    f(acc_t(0), j, load_coef<acc_t>(k.mean, r.stat, j, pe), load_coef<acc_t>(k.rstd, r.stat, j, pe),
      load_coef<acc_t>(k.gamma, r.chan, j, pe), load_coef<acc_t>(k.beta, r.chan, j, pe));
  }
}

// Reads kSize (SIMD) or one (scalar) element of a scalar_t array as T.
template <typename scalar_t, typename T>
inline T load_as(const scalar_t* p) {
  if constexpr (std::is_same_v<T, at::opmath_type<scalar_t>>) {
    return T(*p);
  } else {
    return VecIO<scalar_t>::load(p);
  }
}

template <typename scalar_t, typename T>
inline void store_as(scalar_t* p, const T& v) {
  if constexpr (std::is_same_v<T, at::opmath_type<scalar_t>>) {
    *p = scalar_t(v);
  } else {
    VecIO<scalar_t>::store(p, v);
  }
}

// Per-(n, c) Welford moments over HxW. Channels-first: one contiguous run per (n, c).
// Channels-last: each sample's rows are cut into fixed chunks whose per-channel SIMD Welford states
// are merged in chunk order, so the result does not depend on the thread count.
template <typename scalar_t>
void channel_moments(const scalar_t* X, const ChannelShape& s, at::opmath_type<scalar_t>* mean,
                     at::opmath_type<scalar_t>* m2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  if (!s.channels_last) {
    at::parallel_for(0, s.N * s.C, grain_for(s.HxW), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const auto w = row_moments(X + nc * s.HxW, s.HxW);
        mean[nc] = w.mean;
        m2[nc] = w.m2;
      }
    });
    return;
  }
  const RowChunks rc = row_chunks(s.HxW, s.C);
  std::vector<acc_t> part_mean(s.N * rc.count * s.C), part_m2(s.N * rc.count * s.C);
  at::parallel_for(0, s.N * rc.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / rc.count, k = t % rc.count;
      const int64_t r0 = k * rc.rows_per_chunk, r1 = std::min(s.HxW, r0 + rc.rows_per_chunk);
      acc_t* pm = part_mean.data() + t * s.C;
      acc_t* pq = part_m2.data() + t * s.C;
      std::fill(pm, pm + s.C, acc_t(0));
      std::fill(pq, pq + s.C, acc_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* x = X + (n * s.HxW + r) * s.C;
        const acc_t inv = acc_t(1) / acc_t(r - r0 + 1);
        int64_t c = 0;
        for (; c + IO::kSize <= s.C; c += IO::kSize) {
          const Vec xv = IO::load(x + c);
          Vec m = Vec::loadu(pm + c);
          const Vec d = xv - m;
          m = m + d * Vec(inv);
          (Vec::loadu(pq + c) + d * (xv - m)).store(pq + c);
          m.store(pm + c);
        }
        for (; c < s.C; ++c) {
          const acc_t xv = acc_t(x[c]);
          const acc_t d = xv - pm[c];
          pm[c] += d * inv;
          pq[c] += d * (xv - pm[c]);
        }
      }
    }
  });
  at::parallel_for(0, s.N * s.C, grain_for(rc.count), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / s.C, c = nc % s.C;
      Welford<acc_t, acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t k = 0; k < rc.count; ++k) {
        const int64_t r0 = k * rc.rows_per_chunk;
        const int64_t rows = std::min(s.HxW, r0 + rc.rows_per_chunk) - r0;
        const int64_t i = (n * rc.count + k) * s.C + c;
        w = welford_merge(w, {part_mean[i], part_m2[i], acc_t(rows)});
      }
      mean[nc] = w.mean;
      m2[nc] = w.m2;
    }
  });
}

// Y = act(x̂·gamma + beta + R).
template <typename scalar_t>
void channel_apply(const scalar_t* X, const scalar_t* R, scalar_t* Y, const ChannelShape& s,
                   const ChannelCoefs<at::opmath_type<scalar_t>>& k, int64_t act, double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sl = acc_t(slope);
  for_each_run(s, k.stat_stride, [&](const Run& r) {
    for_each_element<scalar_t>(r, k, [&](auto zero, int64_t j, auto mean, auto rstd, auto gamma, auto beta) {
      using T = decltype(zero);
      const int64_t o = r.offset + j;
      T z = (load_as<scalar_t, T>(X + o) - mean) * rstd * gamma + beta;
      if (R != nullptr) z = z + load_as<scalar_t, T>(R + o);
      store_as<scalar_t, T>(Y + o, act_forward(z, act, sl));
    });
  });
}

// Pre-activation gradient dz = dY·act'(z) at element o, recomputing z from X (and R).
template <typename scalar_t, typename T, typename acc_t>
inline T grad_z(const scalar_t* dY, const scalar_t* X, const scalar_t* R, int64_t o, T xhat, T gamma, T beta,
                int64_t act, acc_t slope) {
  const T dy = load_as<scalar_t, T>(dY + o);
  if (act == kIdentity) return dy;
  T z = xhat * gamma + beta;
  if (R != nullptr) z = z + load_as<scalar_t, T>(R + o);
  return dy * act_grad(z, act, slope);
}

// Per-(n, c) backward sums over HxW: sdz = Σ dz, sdzx = Σ dz·x̂. Same chunking rules as
// channel_moments, so they are deterministic.
template <typename scalar_t>
void channel_grad_sums(const scalar_t* dY, const scalar_t* X, const scalar_t* R, const ChannelShape& s,
                       const ChannelCoefs<at::opmath_type<scalar_t>>& k, int64_t act, double slope,
                       at::opmath_type<scalar_t>* sdz, at::opmath_type<scalar_t>* sdzx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const acc_t sl = acc_t(slope);
  if (!s.channels_last) {
    for_each_run(s, k.stat_stride, [&](const Run& r) {
      Vec v_dz(acc_t(0)), v_dzx(acc_t(0));
      acc_t t_dz = 0, t_dzx = 0;
      for_each_element<scalar_t>(r, k,
                                 [&](auto zero, int64_t j, auto mean, auto rstd, auto gamma, auto beta) {
                                   using T = decltype(zero);
                                   const int64_t o = r.offset + j;
                                   const T xhat = (load_as<scalar_t, T>(X + o) - mean) * rstd;
                                   const T dz = grad_z(dY, X, R, o, xhat, gamma, beta, act, sl);
                                   if constexpr (std::is_same_v<T, acc_t>) {
                                     t_dz += dz;
                                     t_dzx += dz * xhat;
                                   } else {
                                     v_dz = v_dz + dz;
                                     v_dzx = v_dzx + dz * xhat;
                                   }
                                 });
      const int64_t nc = r.offset / s.HxW;
      sdz[nc] = at::vec::vec_reduce_all([](Vec a, Vec b) { return a + b; }, v_dz) + t_dz;
      sdzx[nc] = at::vec::vec_reduce_all([](Vec a, Vec b) { return a + b; }, v_dzx) + t_dzx;
    });
    return;
  }
  const RowChunks rc = row_chunks(s.HxW, s.C);
  std::vector<acc_t> part_dz(s.N * rc.count * s.C), part_dzx(s.N * rc.count * s.C);
  at::parallel_for(0, s.N * rc.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / rc.count, kk = t % rc.count;
      const int64_t r0 = kk * rc.rows_per_chunk, r1 = std::min(s.HxW, r0 + rc.rows_per_chunk);
      acc_t* pdz = part_dz.data() + t * s.C;
      acc_t* pdzx = part_dzx.data() + t * s.C;
      std::fill(pdz, pdz + s.C, acc_t(0));
      std::fill(pdzx, pdzx + s.C, acc_t(0));
      for (int64_t row = r0; row < r1; ++row) {
        const Run r{(n * s.HxW + row) * s.C, s.C, n * k.stat_stride, 0, true};
        for_each_element<scalar_t>(r, k,
                                   [&](auto zero, int64_t j, auto mean, auto rstd, auto gamma, auto beta) {
                                     using T = decltype(zero);
                                     const int64_t o = r.offset + j;
                                     const T xhat = (load_as<scalar_t, T>(X + o) - mean) * rstd;
                                     const T dz = grad_z(dY, X, R, o, xhat, gamma, beta, act, sl);
                                     if constexpr (std::is_same_v<T, acc_t>) {
                                       pdz[j] += dz;
                                       pdzx[j] += dz * xhat;
                                     } else {
                                       (Vec::loadu(pdz + j) + dz).store(pdz + j);
                                       (Vec::loadu(pdzx + j) + dz * xhat).store(pdzx + j);
                                     }
                                   });
      }
    }
  });
  at::parallel_for(0, s.N * s.C, grain_for(rc.count), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / s.C, c = nc % s.C;
      acc_t a = 0, b = 0;
      for (int64_t kk = 0; kk < rc.count; ++kk) {
        a += part_dz[(n * rc.count + kk) * s.C + c];
        b += part_dzx[(n * rc.count + kk) * s.C + c];
      }
      sdz[nc] = a;
      sdzx[nc] = b;
    }
  });
}

// dX = a·dz + b·x̂ + c (coefficients indexed like mean/rstd) and dR = dz; either output may be null.
template <typename scalar_t>
void channel_grad_input(const scalar_t* dY, const scalar_t* X, const scalar_t* R, const ChannelShape& s,
                        const ChannelCoefs<at::opmath_type<scalar_t>>& k,
                        const GradCoefs<at::opmath_type<scalar_t>>& g, int64_t act, double slope,
                        scalar_t* dX, scalar_t* dR) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sl = acc_t(slope);
  for_each_run(s, k.stat_stride, [&](const Run& r) {
    for_each_element<scalar_t>(r, k, [&](auto zero, int64_t j, auto mean, auto rstd, auto gamma, auto beta) {
      using T = decltype(zero);
      const int64_t o = r.offset + j;
      const T xhat = (load_as<scalar_t, T>(X + o) - mean) * rstd;
      const T dz = grad_z(dY, X, R, o, xhat, gamma, beta, act, sl);
      if (dR != nullptr) store_as<scalar_t, T>(dR + o, dz);
      if (dX != nullptr) {
        const bool pe = r.channel_per_element;
        const T dx = load_coef<T>(g.a, r.stat, j, pe) * dz + load_coef<T>(g.b, r.stat, j, pe) * xhat +
                     load_coef<T>(g.c, r.stat, j, pe);
        store_as<scalar_t, T>(dX + o, dx);
      }
    });
  });
}

}  // namespace normext::cpu
