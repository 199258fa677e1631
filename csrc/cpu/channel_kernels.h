// CPU passes shared by every norm whose statistics are per (sample, channel) or per channel
// (GroupNorm, InstanceNorm, BatchNorm): per-(n,c) moments, the normalize+affine+activation apply,
// the backward per-(n,c) sums and the backward elementwise pass. Both layouts are native:
// channels-first walks contiguous HxW runs of one channel, channels-last walks runs of C channels.
#pragma once

#include <utility>
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

// One run of elements of one sample: the HxW elements of channel `chan` (channels-first), or the C
// channels of one spatial position (channels-last, chan = 0).
struct Run {
  int64_t offset;  // element offset of the run in X
  int64_t count;   // elements in the run
  int64_t stat;    // index of the run's first channel in mean/rstd
  int64_t chan;    // channel of the run's first element
};

// Calls body(std::bool_constant<channels_last>, run) for every run of X, in parallel.
template <typename Body>
void for_each_run(const ChannelShape& s, int64_t stat_stride, const Body& body) {
  if (!s.channels_last) {
    at::parallel_for(0, s.N * s.C, grain_for(s.HxW), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t n = nc / s.C, c = nc % s.C;
        body(std::false_type{}, Run{nc * s.HxW, s.HxW, n * stat_stride + c, c});
      }
    });
  } else {
    at::parallel_for(0, s.N * s.HxW, grain_for(s.C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        body(std::true_type{}, Run{row * s.C, s.C, (row / s.HxW) * stat_stride, 0});
      }
    });
  }
}

// Calls f(T{}, j) for the SIMD body (T = Vectorized, j stepping by its width) and the scalar tail
// (T = acc_t) of n elements.
template <typename scalar_t, typename F>
inline void for_simd_and_tail(int64_t n, const F& f) {
  using IO = VecIO<scalar_t>;
  int64_t j = 0;
  for (; j + IO::kSize <= n; j += IO::kSize) f(typename IO::Vec(0), j);
  for (; j < n; ++j) f(typename IO::acc_t(0), j);
}

// Per-channel coefficient for element j of a run as a T: a SIMD load of consecutive channels when
// each element is its own channel, else a broadcast of the run's single channel.
template <bool kPerElem, typename T, typename acc_t>
inline T coef(const acc_t* p, int64_t j) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return kPerElem ? p[j] : p[0];
  } else {
    return kPerElem ? T::loadu(p + j) : T(p[0]);
  }
}

// One element (T = acc_t) or one SIMD vector (T = Vectorized) of a scalar_t array as T.
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

// Pre-activation gradient dz = dy·act'(z), with z recomputed from x̂ (and the residual).
template <int64_t kAct, typename scalar_t, typename T, typename acc_t>
inline T grad_z(const scalar_t* dy, const scalar_t* res, int64_t j, T xhat, T gamma, T beta, acc_t slope) {
  const T g = load_as<scalar_t, T>(dy + j);
  if constexpr (kAct == kIdentity) {
    return g;
  } else {
    T z = xhat * gamma + beta;
    if (res != nullptr) z = z + load_as<scalar_t, T>(res + j);
    return g * act_grad(z, kAct, slope);
  }
}

// The run-level kernels take every pointer by value, already offset to the run, so the hot loops
// keep them in registers (SIMD stores are may-alias and would force reloads through references).

template <typename scalar_t, int64_t kAct, bool kPerElem, typename acc_t = at::opmath_type<scalar_t>>
void apply_run(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t n, const acc_t* mean,
               const acc_t* rstd, const acc_t* gamma, const acc_t* beta, acc_t slope) {
  for_simd_and_tail<scalar_t>(n, [&](auto zero, int64_t j) {
    using T = decltype(zero);
    const T scale = coef<kPerElem, T>(rstd, j) * coef<kPerElem, T>(gamma, j);
    T z = (load_as<scalar_t, T>(x + j) - coef<kPerElem, T>(mean, j)) * scale + coef<kPerElem, T>(beta, j);
    if (res != nullptr) z = z + load_as<scalar_t, T>(res + j);
    store_as<scalar_t, T>(y + j, act_forward(z, kAct, slope));
  });
}

template <typename scalar_t, int64_t kAct, bool kPerElem, typename acc_t = at::opmath_type<scalar_t>>
void grad_input_run(const scalar_t* dy, const scalar_t* x, const scalar_t* res, scalar_t* dx, scalar_t* dres,
                    int64_t n, const acc_t* mean, const acc_t* rstd, const acc_t* gamma, const acc_t* beta,
                    const acc_t* a, const acc_t* b, const acc_t* c, acc_t slope) {
  for_simd_and_tail<scalar_t>(n, [&](auto zero, int64_t j) {
    using T = decltype(zero);
    const T xhat = (load_as<scalar_t, T>(x + j) - coef<kPerElem, T>(mean, j)) * coef<kPerElem, T>(rstd, j);
    const T dz =
        grad_z<kAct>(dy, res, j, xhat, coef<kPerElem, T>(gamma, j), coef<kPerElem, T>(beta, j), slope);
    if (dres != nullptr) store_as<scalar_t, T>(dres + j, dz);
    if (dx != nullptr) {
      const T v = coef<kPerElem, T>(a, j) * dz + coef<kPerElem, T>(b, j) * xhat + coef<kPerElem, T>(c, j);
      store_as<scalar_t, T>(dx + j, v);
    }
  });
}

// Σ dz and Σ dz·x̂ over one channels-first run (one channel).
template <typename scalar_t, int64_t kAct, typename acc_t = at::opmath_type<scalar_t>>
std::pair<acc_t, acc_t> grad_sums_run(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t n,
                                      acc_t mean, acc_t rstd, acc_t gamma, acc_t beta, acc_t slope) {
  using Vec = typename VecIO<scalar_t>::Vec;
  Vec v_dz(0), v_dzx(0);
  acc_t t_dz = 0, t_dzx = 0;
  for_simd_and_tail<scalar_t>(n, [&](auto zero, int64_t j) {
    using T = decltype(zero);
    const T xhat = (load_as<scalar_t, T>(x + j) - T(mean)) * T(rstd);
    const T dz = grad_z<kAct>(dy, res, j, xhat, T(gamma), T(beta), slope);
    if constexpr (std::is_same_v<T, acc_t>) {
      t_dz += dz;
      t_dzx += dz * xhat;
    } else {
      v_dz = v_dz + dz;
      v_dzx = at::vec::fmadd(dz, xhat, v_dzx);
    }
  });
  const auto add = [](Vec p, Vec q) { return p + q; };
  return {at::vec::vec_reduce_all(add, v_dz) + t_dz, at::vec::vec_reduce_all(add, v_dzx) + t_dzx};
}

// Adds dz and dz·x̂ of one channels-last row (C channels) into per-channel accumulators.
template <typename scalar_t, int64_t kAct, typename acc_t = at::opmath_type<scalar_t>>
void grad_sums_row(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t C, const acc_t* mean,
                   const acc_t* rstd, const acc_t* gamma, const acc_t* beta, acc_t slope, acc_t* sdz,
                   acc_t* sdzx) {
  for_simd_and_tail<scalar_t>(C, [&](auto zero, int64_t j) {
    using T = decltype(zero);
    const T xhat = (load_as<scalar_t, T>(x + j) - coef<true, T>(mean, j)) * coef<true, T>(rstd, j);
    const T dz = grad_z<kAct>(dy, res, j, xhat, coef<true, T>(gamma, j), coef<true, T>(beta, j), slope);
    if constexpr (std::is_same_v<T, acc_t>) {
      sdz[j] += dz;
      sdzx[j] += dz * xhat;
    } else {
      (T::loadu(sdz + j) + dz).store(sdz + j);
      at::vec::fmadd(dz, xhat, T::loadu(sdzx + j)).store(sdzx + j);
    }
  });
}

// Moments of a block of `rows` channels-last rows merged into per-channel running moments (double,
// count `seen` so far). Like row_moments: pass 1 sums each channel's deviation from the block's
// first row, pass 2 the squared deviations from the block mean, both in acc_t SIMD; the merge is
// per channel, not per element, so doing it in double costs nothing.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void moments_block(const scalar_t* x, int64_t rows, int64_t C, double seen, acc_t* bsum, acc_t* bm2,
                   double* mean, double* m2) {
  std::fill(bsum, bsum + C, acc_t(0));
  std::fill(bm2, bm2 + C, acc_t(0));
  for (int64_t r = 1; r < rows; ++r) {
    for_simd_and_tail<scalar_t>(C, [&](auto zero, int64_t j) {
      using T = decltype(zero);
      const T d = load_as<scalar_t, T>(x + r * C + j) - load_as<scalar_t, T>(x + j);
      store_as<acc_t, T>(bsum + j, coef<true, T>(bsum, j) + d);
    });
  }
  const acc_t inv = acc_t(1) / acc_t(rows);
  for (int64_t r = 0; r < rows; ++r) {
    for_simd_and_tail<scalar_t>(C, [&](auto zero, int64_t j) {
      using T = decltype(zero);
      const T d = (load_as<scalar_t, T>(x + r * C + j) - load_as<scalar_t, T>(x + j)) -
                  coef<true, T>(bsum, j) * T(inv);
      store_as<acc_t, T>(bm2 + j, coef<true, T>(bm2, j) + d * d);
    });
  }
  for (int64_t j = 0; j < C; ++j) {
    const double bmean = double(acc_t(x[j])) + double(bsum[j]) / double(rows);
    const Moments w =
        welford_merge(Moments{mean[j], m2[j], seen}, Moments{bmean, double(bm2[j]), double(rows)});
    mean[j] = w.mean;
    m2[j] = w.m2;
  }
}

// Channels-last reductions over HxW: each sample's rows are cut into fixed chunks (RowChunks), each
// chunk reduced by one task into C accumulators per output; chunk_fn(n, r0, r1, out0, out1).
// Returns the chunk layout; accumulators are [(n * chunks + k) * C + c].
template <typename acc_t, typename ChunkFn>
RowChunks reduce_channels_last(const ChannelShape& s, std::vector<acc_t>& out0, std::vector<acc_t>& out1,
                               const ChunkFn& chunk_fn) {
  const RowChunks rc = row_chunks(s.HxW, s.C);
  out0.assign(s.N * rc.count * s.C, acc_t(0));
  out1.assign(s.N * rc.count * s.C, acc_t(0));
  at::parallel_for(0, s.N * rc.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / rc.count, k = t % rc.count;
      const int64_t r0 = k * rc.rows_per_chunk, r1 = std::min(s.HxW, r0 + rc.rows_per_chunk);
      chunk_fn(n, r0, r1, out0.data() + t * s.C, out1.data() + t * s.C);
    }
  });
  return rc;
}

// Per-(n, c) moments over HxW (count HxW each), in double (see Moments): a row_moments per contiguous
// run (channels-first), or exact blocks of rows per chunk merged in chunk order (channels-last).
template <typename scalar_t>
void channel_moments(const scalar_t* X, const ChannelShape& s, double* mean, double* m2) {
  using acc_t = at::opmath_type<scalar_t>;
  if (!s.channels_last) {
    at::parallel_for(0, s.N * s.C, grain_for(s.HxW), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const Moments w = row_moments(X + nc * s.HxW, s.HxW);
        mean[nc] = w.mean;
        m2[nc] = w.m2;
      }
    });
    return;
  }
  // Rows per block: at least 8, about 4k values.
  const int64_t block_rows = std::max<int64_t>(8, 4096 / std::max<int64_t>(1, s.C));
  std::vector<double> pm, pq;
  const RowChunks rc =
      reduce_channels_last(s, pm, pq, [&](int64_t n, int64_t r0, int64_t r1, double* cm, double* cq) {
        std::vector<acc_t> bsum(s.C), bm2(s.C);
        for (int64_t r = r0; r < r1; r += block_rows) {
          const int64_t rows = std::min(block_rows, r1 - r);
          moments_block(X + (n * s.HxW + r) * s.C, rows, s.C, double(r - r0), bsum.data(), bm2.data(), cm,
                        cq);
        }
      });
  at::parallel_for(0, s.N * s.C, grain_for(rc.count), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / s.C, c = nc % s.C;
      Moments w{0.0, 0.0, 0.0};
      for (int64_t k = 0; k < rc.count; ++k) {
        const int64_t r0 = k * rc.rows_per_chunk;
        const int64_t rows = std::min(s.HxW, r0 + rc.rows_per_chunk) - r0;
        const int64_t i = (n * rc.count + k) * s.C + c;
        w = welford_merge(w, Moments{pm[i], pq[i], double(rows)});
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
  dispatch_activation(act, [&](auto A) {
    for_each_run(s, k.stat_stride, [&](auto per_elem, const Run& r) {
      apply_run<scalar_t, decltype(A)::value, decltype(per_elem)::value>(
          X + r.offset, R ? R + r.offset : nullptr, Y + r.offset, r.count, k.mean + r.stat, k.rstd + r.stat,
          k.gamma + r.chan, k.beta + r.chan, acc_t(slope));
    });
  });
}

// Per-(n, c) backward sums over HxW: sdz = Σ dz, sdzx = Σ dz·x̂, in a fixed order.
template <typename scalar_t>
void channel_grad_sums(const scalar_t* dY, const scalar_t* X, const scalar_t* R, const ChannelShape& s,
                       const ChannelCoefs<at::opmath_type<scalar_t>>& k, int64_t act, double slope,
                       at::opmath_type<scalar_t>* sdz, at::opmath_type<scalar_t>* sdzx) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sl = acc_t(slope);
  dispatch_activation(act, [&](auto A) {
    if (!s.channels_last) {
      for_each_run(s, k.stat_stride, [&](auto, const Run& r) {
        const auto [a, b] = grad_sums_run<scalar_t, decltype(A)::value>(
            dY + r.offset, X + r.offset, R ? R + r.offset : nullptr, r.count, k.mean[r.stat], k.rstd[r.stat],
            k.gamma[r.chan], k.beta[r.chan], sl);
        const int64_t nc = r.offset / s.HxW;
        sdz[nc] = a;
        sdzx[nc] = b;
      });
      return;
    }
    std::vector<acc_t> pdz, pdzx;
    const RowChunks rc =
        reduce_channels_last(s, pdz, pdzx, [&](int64_t n, int64_t r0, int64_t r1, acc_t* cdz, acc_t* cdzx) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t o = (n * s.HxW + r) * s.C;
            grad_sums_row<scalar_t, decltype(A)::value>(
                dY + o, X + o, R ? R + o : nullptr, s.C, k.mean + n * k.stat_stride,
                k.rstd + n * k.stat_stride, k.gamma, k.beta, sl, cdz, cdzx);
          }
        });
    at::parallel_for(0, s.N * s.C, grain_for(rc.count), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t n = nc / s.C, c = nc % s.C;
        acc_t a = 0, b = 0;
        for (int64_t kk = 0; kk < rc.count; ++kk) {
          a += pdz[(n * rc.count + kk) * s.C + c];
          b += pdzx[(n * rc.count + kk) * s.C + c];
        }
        sdz[nc] = a;
        sdzx[nc] = b;
      }
    });
  });
}

// dX = a·dz + b·x̂ + c (coefficients indexed like mean/rstd) and dR = dz; either output may be null.
template <typename scalar_t>
void channel_grad_input(const scalar_t* dY, const scalar_t* X, const scalar_t* R, const ChannelShape& s,
                        const ChannelCoefs<at::opmath_type<scalar_t>>& k,
                        const GradCoefs<at::opmath_type<scalar_t>>& g, int64_t act, double slope,
                        scalar_t* dX, scalar_t* dR) {
  using acc_t = at::opmath_type<scalar_t>;
  dispatch_activation(act, [&](auto A) {
    for_each_run(s, k.stat_stride, [&](auto per_elem, const Run& r) {
      grad_input_run<scalar_t, decltype(A)::value, decltype(per_elem)::value>(
          dY + r.offset, X + r.offset, R ? R + r.offset : nullptr, dX ? dX + r.offset : nullptr,
          dR ? dR + r.offset : nullptr, r.count, k.mean + r.stat, k.rstd + r.stat, k.gamma + r.chan,
          k.beta + r.chan, g.a + r.stat, g.b + r.stat, g.c + r.stat, acc_t(slope));
    });
  });
}

}  // namespace normext::cpu
