// LayerNorm and LayerNorm2d on the CPU: host entry points registered at the CPU key.
// Rows (LayerNorm; LayerNorm2d in channels-last) are normalized one row at a time with the row kept in
// cache between its statistics and its apply; LayerNorm2d in NCHW keeps SIMD lanes along the contiguous
// spatial positions and walks the channels (a strided reduction over C, no layout copy). RMSNorm is the
// same kernels without the centring (a null mean, no beta); add_*_norm adds the residual stream first.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "channel_kernels.h"
#include "normext/checks.h"

namespace normext::cpu::CPU_CAPABILITY {
namespace {

using at::Tensor;

// Parameter as a pointer in the accumulation type, or `fill` when absent (storage holds the fill).
template <typename acc_t>
const acc_t* param_or(const c10::optional<Tensor>& p, std::vector<acc_t>& storage, int64_t n, acc_t fill) {
  if (p.has_value()) return p->data_ptr<acc_t>();
  storage.assign(n, fill);
  return storage.data();
}

// rstd from the moments (mean, m2) of n values: 1 / sqrt(var + eps), or with rms (RMSNorm) of the mean
// square instead of the variance (norm_var).
template <typename acc_t>
acc_t rstd_of(acc_t mean, acc_t m2, int64_t n, double eps, bool rms) {
  return acc_t(1) / std::sqrt(norm_var(mean, m2 / acc_t(n), rms) + acc_t(eps));
}

// Inputs and statistics shared by the row and NCHW kernels. gamma/beta are never null (ones/zeros when
// absent); R is null without a residual. The forward writes mean/rstd, the backward reads them. A null
// mean is RMSNorm: x̂ = x·rstd with rstd of the mean square (and beta zeros).
template <typename scalar_t>
struct NormPtrs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* X;
  const scalar_t* R;
  const acc_t* gamma;
  const acc_t* beta;
  acc_t* mean;
  acc_t* rstd;
  acc_t slope;
};

// ------------------------------------------------------------------------------------------------ rows

// mean and rstd of a row of D values from its moments, written to *mean_out (null: RMSNorm, whose mean is
// 0) and *rstd_out.
template <typename acc_t>
std::pair<acc_t, acc_t> row_stats(const Moments& w, int64_t D, double eps, acc_t* mean_out, acc_t* rstd_out) {
  const bool rms = mean_out == nullptr;
  const acc_t mean = rms ? acc_t(0) : acc_t(w.mean), rstd = rstd_of(w.mean, w.m2, D, eps, rms);
  if (!rms) *mean_out = mean;
  *rstd_out = rstd;
  return {mean, rstd};
}

// Vector j of one row's apply (count as in for_vectors): y = act((x − mean)·rstd·gamma + beta + res). x is
// in_t: scalar_t, or the float32 row of add_row.
template <typename scalar_t, int64_t kAct, typename in_t, typename acc_t, typename Count>
inline void apply_vec(const in_t* x, const scalar_t* res, scalar_t* y, int64_t j, Count count, acc_t mean,
                      acc_t rstd, const acc_t* gamma, const acc_t* beta, acc_t slope) {
  using T = typename VecIO<scalar_t>::Vec;
  const T scale = T(rstd) * coef<T>(gamma, j, count);
  T z = (load_as<in_t, T>(x + j, count) - T(mean)) * scale + coef<T>(beta, j, count);
  if (res != nullptr) z = z + load_as<scalar_t, T>(res + j, count);
  store_as<scalar_t, T>(y + j, act_forward(z, kAct, slope), count);
}

// One row: moments (row_moments), then the apply re-reading the row from cache. Pointers come by value,
// already offset to the row, so the hot loops keep them in registers. mean_out null: RMSNorm.
template <typename scalar_t, int64_t kAct, typename in_t = scalar_t,
          typename acc_t = at::opmath_type<scalar_t>>
void forward_row(const in_t* x, const scalar_t* res, scalar_t* y, int64_t D, const acc_t* gamma,
                 const acc_t* beta, double eps, acc_t slope, acc_t* mean_out, acc_t* rstd_out) {
  const auto [mean, rstd] = row_stats(row_moments(x, D), D, eps, mean_out, rstd_out);
  for_vectors<scalar_t>(D, [&](auto, int64_t j, auto count) {
    apply_vec<scalar_t, kAct>(x, res, y, j, count, mean, rstd, gamma, beta, slope);
  });
}

// The residual stream of add_*_norm: s = x + a (added in float32, rounded to res_t) is written to S, and
// normalized from there. A and S are null otherwise.
template <typename res_t>
struct AddPtrs {
  const res_t* A = nullptr;
  res_t* S = nullptr;
};

// One row of s = x + a into s_out (res_t) and, as rounded there, into the float row `srow` that the
// normalization then reads from cache: x and a are read once, out is exactly norm(s).
template <typename scalar_t, typename res_t, typename acc_t = at::opmath_type<scalar_t>>
void add_row(const scalar_t* x, const res_t* a, res_t* s_out, acc_t* srow, int64_t D) {
  for_vectors<scalar_t>(D, [&](auto zero, int64_t j, auto count) {
    using T = decltype(zero);
    store_as<res_t, T>(s_out + j, load_as<scalar_t, T>(x + j, count) + load_as<res_t, T>(a + j, count),
                       count);
    store_as<acc_t, T>(srow + j, load_as<res_t, T>(s_out + j, count), count);
  });
}

// Forward over M rows of D elements, gamma/beta per element; one row per iteration of a parallel_for.
template <typename scalar_t, int64_t kAct, typename res_t = scalar_t>
void rows_forward(const NormPtrs<scalar_t>& p, scalar_t* Y, int64_t M, int64_t D, double eps,
                  AddPtrs<res_t> add = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = typename VecIO<scalar_t>::Vec;
  at::parallel_for(0, M, grain_for(D), [&](int64_t begin, int64_t end) {
    if (add.A == nullptr && D > 0 && D <= kMomentsBlock<scalar_t>) {
      // Rows of one block: row r's apply is the side work of the loop that sums row r + 1, so the loads of
      // the next row stream while this one is written: row at a time, they waited behind its reductions
      // (512×768 float32 forward, 1 thread: 0.94× → 0.99× torch's thread time). The sums, so every result,
      // are forward_row's.
      Moments w = row_moments(p.X + begin * D, D);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t o = row * D;
        const auto st = row_stats(w, D, eps, p.mean != nullptr ? p.mean + row : nullptr, p.rstd + row);
        const auto apply = [x = p.X + o, res = p.R != nullptr ? p.R + o : nullptr, y = Y + o, gamma = p.gamma,
                            beta = p.beta, mean = st.first, rstd = st.second,
                            slope = p.slope](int64_t j, auto count) {
          apply_vec<scalar_t, kAct>(x, res, y, j, count, mean, rstd, gamma, beta, slope);
        };
        if (row + 1 == end) {
          for_vectors<scalar_t>(D, [&](auto, int64_t j, auto count) { apply(j, count); });
          break;
        }
        const scalar_t* next = p.X + o + D;
        const acc_t shift = block_shift(next, D);
        w = add_block(Moments{0.0, 0.0, 0.0}, next, D, shift,
                      deviation_sums(next, D, Vec(shift), Vec(0), apply));
      }
      return;
    }
    std::vector<acc_t> srow(add.A != nullptr ? D : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * D;
      const scalar_t* res = p.R != nullptr ? p.R + o : nullptr;
      acc_t* mean = p.mean != nullptr ? p.mean + row : nullptr;
      if (add.A != nullptr) {
        add_row(p.X + o, add.A + o, add.S + o, srow.data(), D);
        forward_row<scalar_t, kAct>(srow.data(), res, Y + o, D, p.gamma, p.beta, eps, p.slope, mean,
                                    p.rstd + row);
      } else {
        forward_row<scalar_t, kAct>(p.X + o, res, Y + o, D, p.gamma, p.beta, eps, p.slope, mean,
                                    p.rstd + row);
      }
    }
  });
}

// Backward outputs and the dgamma/dbeta partial rows (null when not needed).
template <typename scalar_t>
struct GradPtrs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dY;
  scalar_t* dX;
  scalar_t* dR;
  acc_t* part_dgamma;
  acc_t* part_dbeta;
};

// One row of the backward. Pass A computes dz (kept in `scratch` when an activation makes it costly to
// recompute), Σ gamma·dz and Σ gamma·dz·x̂, and adds dz·x̂ and dz to the dgamma/dbeta partial rows pg/pb
// (may be null); pass B writes dx = rstd·(gamma·dz − mean(gamma·dz) − x̂·mean(gamma·dz·x̂)), without the
// mean(gamma·dz) term for RMSNorm (rms: mean is 0 and not a function of x).
template <typename scalar_t, int64_t kAct, typename acc_t = at::opmath_type<scalar_t>>
void backward_row(const scalar_t* dy, const scalar_t* x, const scalar_t* res, scalar_t* dx, scalar_t* dres,
                  int64_t D, acc_t mean, acc_t rstd, bool rms, const acc_t* gamma, const acc_t* beta,
                  acc_t slope, acc_t* pg, acc_t* pb, acc_t* scratch) {
  using Vec = typename VecIO<scalar_t>::Vec;
  constexpr bool kScratch = base_activation(kAct) != kIdentity;
  Vec v1(0), v2(0);
  for_vectors<scalar_t>(D, [&](auto zero, int64_t j, auto count) {
    using T = decltype(zero);
    const T g = coef<T>(gamma, j, count), b = coef<T>(beta, j, count);
    // From the output x̂ = (v − β)/γ per element (xhat_source.h); else (x − mean)·rstd of the row.
    const auto [xhat, dz] = from_output(kAct)
                                ? xhat_dz<kAct>(dy, x, res, j, b, T(acc_t(1)) / g, g, b, slope, count)
                                : xhat_dz<kAct>(dy, x, res, j, T(mean), T(rstd), g, b, slope, count);
    if constexpr (kScratch) store_as<acc_t, T>(scratch + j, dz, count);
    if (dres != nullptr) store_as<scalar_t, T>(dres + j, dz, count);
    if (pg != nullptr) store_as<acc_t, T>(pg + j, coef<T>(pg, j, count) + dz * xhat, count);
    if (pb != nullptr) store_as<acc_t, T>(pb + j, coef<T>(pb, j, count) + dz, count);
    const T gdz = g * dz;
    if constexpr (std::is_same_v<decltype(count), WholeVec>) {
      v1 = v1 + gdz;
      v2 = at::vec::fmadd(gdz, xhat, v2);
    } else {
      v1 = v1 + keep_lanes(gdz, count);
      v2 = v2 + keep_lanes(gdz * xhat, count);
    }
  });
  if (dx == nullptr) return;
  const auto add = [](Vec a, Vec b) { return a + b; };
  const acc_t c1 = rms ? acc_t(0) : at::vec::vec_reduce_all(add, v1) / acc_t(D);
  const acc_t c2 = at::vec::vec_reduce_all(add, v2) / acc_t(D);
  for_vectors<scalar_t>(D, [&](auto zero, int64_t j, auto count) {
    using T = decltype(zero);
    const T g = coef<T>(gamma, j, count);
    const T xhat = from_output(kAct)
                       ? xhat_at<kAct>(x, res, j, coef<T>(beta, j, count), T(acc_t(1)) / g, slope, count)
                       : xhat_at<kAct>(x, res, j, T(mean), T(rstd), slope, count);
    T dz;
    if constexpr (kScratch) {
      dz = load_as<acc_t, T>(scratch + j, count);
    } else {
      dz = load_as<scalar_t, T>(dy + j, count);
    }
    store_as<scalar_t, T>(dx + j, T(rstd) * (g * dz - T(c1) - xhat * T(c2)), count);
  });
}

// Row chunks of the backward, fixed by the shape. Each chunk owns one dgamma/dbeta partial row (zeroed, then
// summed by sum_partials), so chunks hold about 2^17 elements to keep that traffic small, and there are at
// least 16 of 32 rows or more where there are rows for them, all of one size, so that threads get equal
// shares: 512×768 in 170-row chunks gave two threads 340 and 172 rows (bench, 2 threads, vit_b.ln float32
// forward+backward 0.80× → 0.90×). Row r's dx pass as side work of row r + 1's sums (as in rows_forward) was
// slower: 0.97-1.00× → 0.94-0.96× at 1 thread.
RowChunks backward_chunks(int64_t M, int64_t D) {
  constexpr int64_t kElemsPerChunk = 1 << 17;
  const int64_t by_size = (M * std::max<int64_t>(1, D) + kElemsPerChunk - 1) / kElemsPerChunk;
  const int64_t want = std::max<int64_t>({1, by_size, std::min<int64_t>(16, M / 32)});
  const int64_t per = std::max<int64_t>(1, (M + want - 1) / want);
  return {per, std::max<int64_t>(1, (M + per - 1) / per)};
}

// Backward over M rows of D elements in backward_chunks; the result does not depend on the thread count.
template <typename scalar_t, int64_t kAct>
void rows_backward(const NormPtrs<scalar_t>& p, const GradPtrs<scalar_t>& gp, int64_t M, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowChunks rc = backward_chunks(M, D);
  at::parallel_for(0, rc.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kAct != kIdentity ? D : 0);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* pg = gp.part_dgamma != nullptr ? gp.part_dgamma + chunk * D : nullptr;
      acc_t* pb = gp.part_dbeta != nullptr ? gp.part_dbeta + chunk * D : nullptr;
      if (pg != nullptr) std::fill(pg, pg + D, acc_t(0));
      if (pb != nullptr) std::fill(pb, pb + D, acc_t(0));
      const int64_t r0 = chunk * rc.rows_per_chunk, r1 = std::min(M, r0 + rc.rows_per_chunk);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t o = row * D;
        backward_row<scalar_t, kAct>(
            gp.dY + o, p.X + o, p.R != nullptr ? p.R + o : nullptr, gp.dX != nullptr ? gp.dX + o : nullptr,
            gp.dR != nullptr ? gp.dR + o : nullptr, D, p.mean != nullptr ? p.mean[row] : acc_t(0),
            p.rstd[row], p.mean == nullptr, p.gamma, p.beta, p.slope, pg, pb, scratch.data());
      }
    }
  });
}

// dgamma[j] = Σ_k part_g[k·D + j] (and dbeta from part_b) over the `count` partial rows, in k order
// (deterministic); null pairs are skipped. One parallel region for both, and none when the partials are
// small: on a busy machine every region's join can cost a scheduler tick.
template <typename acc_t>
void sum_partials(const acc_t* part_g, const acc_t* part_b, int64_t count, int64_t D, acc_t* dgamma,
                  acc_t* dbeta) {
  at::parallel_for(0, D, std::max<int64_t>(1, kInlineSumElems / std::max<int64_t>(1, count)),
                   [&](int64_t begin, int64_t end) {
                     for (const auto& [part, out] : {std::pair{part_g, dgamma}, std::pair{part_b, dbeta}}) {
                       if (out == nullptr) continue;
                       std::fill(out + begin, out + end, acc_t(0));
                       for (int64_t k = 0; k < count; ++k) {
                         const acc_t* src = part + k * D;
                         for (int64_t j = begin; j < end; ++j) out[j] += src[j];
                       }
                     }
                   });
}

// ------------------------------------------------------------------------------------------ NCHW 2d

// LayerNorm2d on (N, C, HxW)-contiguous X. A task is one sample n and a block of up to kBlockVecs SIMD
// vectors of consecutive positions (the positions past the last whole vector run as scalar lanes); it
// walks the C channels with stride HxW, each lane running its own Welford over the channels of its
// position. Tasks never share a position, so the forward is deterministic by construction.
constexpr int64_t kBlockVecs = 8;

struct Block2d {
  int64_t N, C, HxW;
  int64_t per_n;  // blocks per sample
  int64_t block;  // positions per block
};

template <typename scalar_t>
Block2d blocks_2d(const ChannelDims& d) {
  const int64_t block = kBlockVecs * VecIO<scalar_t>::kSize;
  return {d.N, d.C, d.HxW, (d.HxW + block - 1) / block, block};
}

// Positions [p0, p0 + nl·W) of sample n as nl lanes of T (W = 1 for acc_t, the vector size for Vec).
template <typename T, typename scalar_t>
constexpr int64_t lanes_of() {
  return std::is_same_v<T, at::opmath_type<scalar_t>> ? 1 : VecIO<scalar_t>::kSize;
}

template <typename T, typename scalar_t>
constexpr int64_t max_lanes() {
  return std::is_same_v<T, at::opmath_type<scalar_t>> ? VecIO<scalar_t>::kSize : kBlockVecs;
}

// Per-lane mean and rstd over the C channels (Welford on x − x[c = 0], so a mean far from zero keeps
// its low bits); writes them to the statistics and returns them in m / rs. mean_out null: RMSNorm (rstd
// of the mean square, m = 0).
template <typename T, typename scalar_t>
void lanes_moments(const scalar_t* x, int64_t nl, int64_t C, int64_t HxW, double eps, T* m, T* rs,
                   at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = lanes_of<T, scalar_t>();
  T shift[max_lanes<T, scalar_t>()], q[max_lanes<T, scalar_t>()];
  for (int64_t l = 0; l < nl; ++l) {
    shift[l] = load_as<scalar_t, T>(x + l * W);
    m[l] = T(acc_t(0));
    q[l] = T(acc_t(0));
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xc = x + c * HxW;
    const T inv(acc_t(1) / acc_t(c + 1));
    for (int64_t l = 0; l < nl; ++l) {
      const T v = load_as<scalar_t, T>(xc + l * W) - shift[l];
      const T d = v - m[l];
      m[l] = m[l] + d * inv;
      q[l] = q[l] + d * (v - m[l]);
    }
  }
  const bool rms = mean_out == nullptr;
  const T var_eps = T(acc_t(eps));
  const T inv_c(acc_t(1) / acc_t(C));
  for (int64_t l = 0; l < nl; ++l) {
    m[l] = m[l] + shift[l];
    if constexpr (W == 1) {
      rs[l] = rstd_of(m[l], q[l], C, eps, rms);
    } else {
      rs[l] = (norm_var(m[l], q[l] * inv_c, rms) + var_eps).rsqrt();
    }
    if (rms) {
      m[l] = T(acc_t(0));
    } else {
      store_as<acc_t, T>(mean_out + l * W, m[l]);
    }
    store_as<acc_t, T>(rstd_out + l * W, rs[l]);
  }
}

template <typename T, typename scalar_t, int64_t kAct>
void block_2d_forward(const NormPtrs<scalar_t>& p, scalar_t* Y, const Block2d& s, int64_t n, int64_t p0,
                      int64_t nl, double eps) {
  constexpr int64_t W = lanes_of<T, scalar_t>();
  T m[max_lanes<T, scalar_t>()], rs[max_lanes<T, scalar_t>()];
  const int64_t base = n * s.C * s.HxW + p0;
  const int64_t stat = n * s.HxW + p0;
  lanes_moments<T>(p.X + base, nl, s.C, s.HxW, eps, m, rs, p.mean != nullptr ? p.mean + stat : nullptr,
                   p.rstd + stat);
  const scalar_t* const R = p.R;
  const auto slope = p.slope;
  for (int64_t c = 0; c < s.C; ++c) {
    const int64_t o = base + c * s.HxW;
    const T g(p.gamma[c]), b(p.beta[c]);
    for (int64_t l = 0; l < nl; ++l) {
      T z = (load_as<scalar_t, T>(p.X + o + l * W) - m[l]) * rs[l] * g + b;
      if (R != nullptr) z = z + load_as<scalar_t, T>(R + o + l * W);
      store_as<scalar_t, T>(Y + o + l * W, act_forward(z, kAct, slope));
    }
  }
}

// Runs body(T, p0, nl) on every block of sample n's positions: whole vectors, then the scalar rest.
template <typename scalar_t, typename Body>
void for_block_lanes(const Block2d& s, int64_t blk, const Body& body) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = typename VecIO<scalar_t>::Vec;
  constexpr int64_t V = VecIO<scalar_t>::kSize;
  const int64_t p0 = blk * s.block;
  const int64_t len = std::min(s.block, s.HxW - p0);
  const int64_t nv = len / V;
  if (nv > 0) body(Vec(acc_t(0)), p0, nv);
  if (len > nv * V) body(acc_t(0), p0 + nv * V, len - nv * V);
}

template <typename scalar_t, int64_t kAct>
void nchw_forward(const NormPtrs<scalar_t>& p, scalar_t* Y, const Block2d& s, double eps) {
  at::parallel_for(0, s.N * s.per_n, grain_for(s.C * s.block), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / s.per_n;
      for_block_lanes<scalar_t>(s, t % s.per_n, [&](auto zero, int64_t p0, int64_t nl) {
        block_2d_forward<decltype(zero), scalar_t, kAct>(p, Y, s, n, p0, nl, eps);
      });
    }
  });
}

// Backward of one block: pass A over the channels accumulates, per lane, Σ gamma·dz and Σ gamma·dz·x̂
// (and adds the block's Σ dz·x̂, Σ dz of each channel to its dgamma/dbeta partial row); pass B writes dx.
// dz is kept in `scratch` (C·nl lanes) when an activation makes it costly to recompute. A null mean is
// RMSNorm, as in backward_row.
template <typename T, typename scalar_t, int64_t kAct>
void block_2d_backward(const NormPtrs<scalar_t>& p, const GradPtrs<scalar_t>& gp, const Block2d& s, int64_t n,
                       int64_t p0, int64_t nl, at::opmath_type<scalar_t>* pg, at::opmath_type<scalar_t>* pb,
                       at::opmath_type<scalar_t>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = lanes_of<T, scalar_t>();
  constexpr int64_t L = max_lanes<T, scalar_t>();
  constexpr bool kScratch = base_activation(kAct) != kIdentity;
  auto hsum = [](T v) {
    if constexpr (W == 1) {
      return v;
    } else {
      return at::vec::vec_reduce_all([](T a, T b) { return a + b; }, v);
    }
  };
  const int64_t base = n * s.C * s.HxW + p0;
  const int64_t stat = n * s.HxW + p0;
  T m[L], rs[L], s1[L], s2[L];
  for (int64_t l = 0; l < nl; ++l) {
    m[l] = p.mean != nullptr ? load_as<acc_t, T>(p.mean + stat + l * W) : T(acc_t(0));
    rs[l] = load_as<acc_t, T>(p.rstd + stat + l * W);
    s1[l] = T(acc_t(0));
    s2[l] = T(acc_t(0));
  }
  const scalar_t* const X = p.X;
  const scalar_t* const R = p.R;
  const scalar_t* const dY = gp.dY;
  const auto slope = p.slope;
  for (int64_t c = 0; c < s.C; ++c) {
    const int64_t o = base + c * s.HxW;
    const T g(p.gamma[c]), b(p.beta[c]), ig(acc_t(1) / p.gamma[c]);
    T dzx(acc_t(0)), dzs(acc_t(0));
    for (int64_t l = 0; l < nl; ++l) {
      const int64_t e = o + l * W;
      const auto [xhat, dz] = from_output(kAct) ? xhat_dz<kAct>(dY, X, R, e, b, ig, g, b, slope)
                                                : xhat_dz<kAct>(dY, X, R, e, m[l], rs[l], g, b, slope);
      if constexpr (kScratch) store_as<acc_t, T>(scratch + (c * nl + l) * W, dz);
      if (gp.dR != nullptr) store_as<scalar_t, T>(gp.dR + e, dz);
      s1[l] = s1[l] + g * dz;
      s2[l] = s2[l] + g * dz * xhat;
      dzx = dzx + dz * xhat;
      dzs = dzs + dz;
    }
    if (pg != nullptr) pg[c] += hsum(dzx);
    if (pb != nullptr) pb[c] += hsum(dzs);
  }
  if (gp.dX == nullptr) return;
  const T inv_c(acc_t(1) / acc_t(s.C));
  for (int64_t l = 0; l < nl; ++l) {
    s1[l] = p.mean != nullptr ? s1[l] * inv_c : T(acc_t(0));
    s2[l] = s2[l] * inv_c;
  }
  for (int64_t c = 0; c < s.C; ++c) {
    const int64_t o = base + c * s.HxW;
    const T g(p.gamma[c]), b(p.beta[c]), ig(acc_t(1) / p.gamma[c]);
    for (int64_t l = 0; l < nl; ++l) {
      const int64_t e = o + l * W;
      const T xhat = from_output(kAct) ? xhat_at<kAct>(X, R, e, b, ig, slope)
                                       : xhat_at<kAct>(X, R, e, m[l], rs[l], slope);
      T dz;
      if constexpr (kScratch) {
        dz = load_as<acc_t, T>(scratch + (c * nl + l) * W);
      } else {
        dz = load_as<scalar_t, T>(dY + e);
      }
      store_as<scalar_t, T>(gp.dX + e, rs[l] * (g * dz - s1[l] - xhat * s2[l]));
    }
  }
}

// Tasks as in the forward; each task owns one C-element dgamma/dbeta partial row, summed in task order.
template <typename scalar_t, int64_t kAct>
void nchw_backward(const NormPtrs<scalar_t>& p, const GradPtrs<scalar_t>& gp, const Block2d& s) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, s.N * s.per_n, grain_for(s.C * s.block), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(base_activation(kAct) != kIdentity ? s.C * s.block : 0);
    for (int64_t t = begin; t < end; ++t) {
      acc_t* pg = gp.part_dgamma != nullptr ? gp.part_dgamma + t * s.C : nullptr;
      acc_t* pb = gp.part_dbeta != nullptr ? gp.part_dbeta + t * s.C : nullptr;
      if (pg != nullptr) std::fill(pg, pg + s.C, acc_t(0));
      if (pb != nullptr) std::fill(pb, pb + s.C, acc_t(0));
      const int64_t n = t / s.per_n;
      for_block_lanes<scalar_t>(s, t % s.per_n, [&](auto zero, int64_t p0, int64_t nl) {
        block_2d_backward<decltype(zero), scalar_t, kAct>(p, gp, s, n, p0, nl, pg, pb, scratch.data());
      });
    }
  });
}

// ------------------------------------------------------------------------------------------- host side

// Rows or NCHW-2d forward into Y (allocated like X); mean/rstd hold one value per row / position (mean
// undefined: RMSNorm). add: the residual stream of add_*_norm (rows only).
template <typename scalar_t, typename res_t = scalar_t>
void forward_impl(const Tensor& X, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
                  const c10::optional<Tensor>& residual, double eps, int64_t act, double slope, Tensor& Y,
                  Tensor& mean, Tensor& rstd, int64_t M, int64_t D, const ChannelDims* nchw,
                  AddPtrs<res_t> add = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> ones, zeros;
  const NormPtrs<scalar_t> p{X.const_data_ptr<scalar_t>(),
                             residual ? residual->const_data_ptr<scalar_t>() : nullptr,
                             param_or(gamma, ones, D, acc_t(1)),
                             param_or(beta, zeros, D, acc_t(0)),
                             mean.defined() ? mean.data_ptr<acc_t>() : nullptr,
                             rstd.data_ptr<acc_t>(),
                             acc_t(slope)};
  scalar_t* y = Y.data_ptr<scalar_t>();
  dispatch_activation(act, [&](auto kAct) {
    if (nchw != nullptr) {
      nchw_forward<scalar_t, decltype(kAct)::value>(p, y, blocks_2d<scalar_t>(*nchw), eps);
    } else {
      rows_forward<scalar_t, decltype(kAct)::value>(p, y, M, D, eps, add);
    }
  });
}

template <typename scalar_t>
void backward_impl(const Tensor& dY, const Tensor& X, const c10::optional<Tensor>& residual,
                   const Tensor& mean, const Tensor& rstd, const c10::optional<Tensor>& gamma,
                   const c10::optional<Tensor>& beta, int64_t act, double slope, std::array<bool, 4> mask,
                   Tensor& dX, Tensor& dgamma, Tensor& dbeta, Tensor& dR, int64_t M, int64_t D,
                   const ChannelDims* nchw) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> ones, zeros;
  const NormPtrs<scalar_t> p{X.const_data_ptr<scalar_t>(),
                             residual ? residual->const_data_ptr<scalar_t>() : nullptr,
                             param_or(gamma, ones, D, acc_t(1)),
                             param_or(beta, zeros, D, acc_t(0)),
                             mean.defined() ? mean.data_ptr<acc_t>() : nullptr,
                             rstd.data_ptr<acc_t>(),
                             acc_t(slope)};
  const Block2d s = nchw != nullptr ? blocks_2d<scalar_t>(*nchw) : Block2d{};
  const int64_t parts = nchw != nullptr ? s.N * s.per_n : backward_chunks(M, D).count;
  std::vector<acc_t> part_g(mask[1] ? parts * D : 0), part_b(mask[2] ? parts * D : 0);
  const GradPtrs<scalar_t> gp{dY.const_data_ptr<scalar_t>(), mask[0] ? dX.data_ptr<scalar_t>() : nullptr,
                              mask[3] ? dR.data_ptr<scalar_t>() : nullptr, mask[1] ? part_g.data() : nullptr,
                              mask[2] ? part_b.data() : nullptr};
  dispatch_grad_activation(act, [&](auto kAct) {
    if (nchw != nullptr) {
      nchw_backward<scalar_t, decltype(kAct)::value>(p, gp, s);
    } else {
      rows_backward<scalar_t, decltype(kAct)::value>(p, gp, M, D);
    }
  });
  sum_partials<acc_t>(part_g.data(), part_b.data(), parts, D, mask[1] ? dgamma.data_ptr<acc_t>() : nullptr,
                      mask[2] ? dbeta.data_ptr<acc_t>() : nullptr);
}

// Forward of checked rows (LayerNorm, or RMSNorm with rms: no mean); with A (the residual stream of
// add_*_norm, already in residual_dtype) also S = X + A. Rows of no elements get NaN statistics.
struct RowsOut {
  Tensor Y, S, mean, rstd;
};

RowsOut rows_fwd(const LayerNormArgs& a, double eps, int64_t act, double slope, bool rms,
                 const Tensor* A = nullptr) {
  RowsOut o{at::empty_like(a.X), A != nullptr ? at::empty_like(*A) : Tensor(), Tensor(),
            at::empty(a.stat_shape, a.X.options().dtype(acc_dtype(a.X)))};
  if (!rms) o.mean = at::empty_like(o.rstd);
  if (a.M == 0) return o;
  if (a.D == 0) {
    if (o.mean.defined()) o.mean.fill_(std::nan(""));
    o.rstd.fill_(std::nan(""));
    return o;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "layer_norm_fwd_cpu", [&] {
    if (A == nullptr || A->scalar_type() == a.X.scalar_type()) {
      const AddPtrs<scalar_t> add{A != nullptr ? A->const_data_ptr<scalar_t>() : nullptr,
                                  A != nullptr ? o.S.data_ptr<scalar_t>() : nullptr};
      forward_impl<scalar_t>(a.X, a.gamma, a.beta, a.residual, eps, act, slope, o.Y, o.mean, o.rstd, a.M, a.D,
                             nullptr, add);
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      // A float32 residual stream beside 16-bit activations (check_add_residual allows nothing else).
      const AddPtrs<float> add{A->const_data_ptr<float>(), o.S.data_ptr<float>()};
      forward_impl<scalar_t, float>(a.X, a.gamma, a.beta, a.residual, eps, act, slope, o.Y, o.mean, o.rstd,
                                    a.M, a.D, nullptr, add);
    }
  });
  return o;
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& X_in, const c10::optional<Tensor>& gamma,
                                                      const c10::optional<Tensor>& beta,
                                                      const c10::optional<Tensor>& residual,
                                                      at::IntArrayRef normalized_shape, double eps,
                                                      int64_t act, double slope) {
  const auto a = check_layer_norm(X_in, normalized_shape, gamma, beta, residual, act, "layer_norm_fwd");
  auto o = rows_fwd(a, eps, act, slope, false);
  return {o.Y, o.mean, o.rstd};
}

std::tuple<Tensor, Tensor> rms_norm_fwd_cpu(const Tensor& X_in, const c10::optional<Tensor>& gamma,
                                            const c10::optional<Tensor>& residual,
                                            at::IntArrayRef normalized_shape, double eps, int64_t act,
                                            double slope) {
  const auto a = check_layer_norm(X_in, normalized_shape, gamma, c10::nullopt, residual, act, "rms_norm_fwd");
  auto o = rows_fwd(a, eps, act, slope, true);
  return {o.Y, o.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_cpu(
    const Tensor& X_in, const Tensor& R, const c10::optional<Tensor>& gamma,
    const c10::optional<Tensor>& beta, at::IntArrayRef normalized_shape, double eps,
    c10::optional<at::ScalarType> residual_dtype) {
  constexpr const char* op = "add_layer_norm_fwd";
  const auto a = check_layer_norm(X_in, normalized_shape, gamma, beta, c10::nullopt, kIdentity, op);
  const Tensor A = check_add_residual(R, a.X, residual_dtype, op);
  auto o = rows_fwd(a, eps, kIdentity, 0.0, false, &A);
  return {o.Y, o.S, o.mean, o.rstd};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_fwd_cpu(const Tensor& X_in, const Tensor& R,
                                                        const c10::optional<Tensor>& gamma,
                                                        at::IntArrayRef normalized_shape, double eps,
                                                        c10::optional<at::ScalarType> residual_dtype) {
  constexpr const char* op = "add_rms_norm_fwd";
  const auto a = check_layer_norm(X_in, normalized_shape, gamma, c10::nullopt, c10::nullopt, kIdentity, op);
  const Tensor A = check_add_residual(R, a.X, residual_dtype, op);
  auto o = rows_fwd(a, eps, kIdentity, 0.0, true, &A);
  return {o.Y, o.S, o.rstd};
}

// Outputs of a backward op: unselected ones are empty; dgamma/dbeta are in the accumulation type.
std::tuple<Tensor, Tensor, Tensor, Tensor> alloc_grads(const Tensor& X, at::IntArrayRef param_shape,
                                                       std::array<bool, 4> mask) {
  const auto acc_opts = X.options().dtype(acc_dtype(X));
  return {mask[0] ? at::empty_like(X) : at::empty({0}, X.options()),
          mask[1] ? at::zeros(param_shape, acc_opts) : at::empty({0}, acc_opts),
          mask[2] ? at::zeros(param_shape, acc_opts) : at::empty({0}, acc_opts),
          mask[3] ? at::empty_like(X) : at::empty({0}, X.options())};
}

// Backward of checked rows; mean_in undefined: RMSNorm.
std::tuple<Tensor, Tensor, Tensor, Tensor> rows_bwd(const Tensor& dY_in, const LayerNormArgs& a,
                                                    const Tensor& mean_in, const Tensor& rstd_in,
                                                    at::IntArrayRef normalized_shape, int64_t act,
                                                    double slope, std::array<bool, 4> mask, const char* op) {
  const Tensor dY = *check_like(dY_in, a.X, Layout::kChannelsFirst, "grad_output", op);
  const Tensor mean = mean_in.defined() ? check_stats(mean_in, a.X, a.M, "mean", op) : Tensor();
  const Tensor rstd = check_stats(rstd_in, a.X, a.M, "rstd", op);
  auto [dX, dgamma, dbeta, dR] = alloc_grads(a.X, normalized_shape, mask);
  if (a.X.numel() == 0) return {dX, dgamma, dbeta, dR};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "layer_norm_bwd_cpu", [&] {
    backward_impl<scalar_t>(dY, a.X, a.residual, mean, rstd, a.gamma, a.beta, act, slope, mask, dX, dgamma,
                            dbeta, dR, a.M, a.D, nullptr);
  });
  return {dX, dgamma, dbeta, dR};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_bwd_cpu(
    const Tensor& dY_in, const Tensor& X_in, const c10::optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    at::IntArrayRef normalized_shape, int64_t act, double slope, std::array<bool, 4> mask) {
  constexpr const char* op = "layer_norm_bwd";
  const auto a =
      check_layer_norm(X_in, normalized_shape, gamma, beta, residual, check_grad_activation(act, op), op);
  return rows_bwd(dY_in, a, mean_in, rstd_in, normalized_shape, act, slope, mask, op);
}

// RMSNorm's backward: output_mask selects (dX, dgamma, dresidual), as for layer_norm_bwd without dbeta.
std::tuple<Tensor, Tensor, Tensor> rms_norm_bwd_cpu(const Tensor& dY_in, const Tensor& X_in,
                                                    const c10::optional<Tensor>& residual,
                                                    const Tensor& rstd_in, const c10::optional<Tensor>& gamma,
                                                    at::IntArrayRef normalized_shape, int64_t act,
                                                    double slope, std::array<bool, 3> mask) {
  constexpr const char* op = "rms_norm_bwd";
  const auto a = check_layer_norm(X_in, normalized_shape, gamma, c10::nullopt, residual,
                                  check_grad_activation(act, op), op);
  auto [dX, dgamma, dbeta, dR] = rows_bwd(dY_in, a, Tensor(), rstd_in, normalized_shape, act, slope,
                                          {mask[0], mask[1], false, mask[2]}, op);
  return {dX, dgamma, dR};
}

// Channel (2d) forward of checked input, LayerNorm2d or with rms RMSNorm2d (mean left undefined).
std::tuple<Tensor, Tensor, Tensor> fwd_2d(const ChannelNormArgs& a, double eps, int64_t act, double slope,
                                          bool rms) {
  const auto [N, C, HxW] = a.dims;
  Tensor Y = at::empty_like(a.X);
  Tensor rstd = at::empty({N, HxW}, a.X.options().dtype(acc_dtype(a.X)));
  Tensor mean = rms ? Tensor() : at::empty_like(rstd);
  if (N * HxW == 0) return {Y, mean, rstd};
  if (C == 0) {
    if (!rms) mean.fill_(std::nan(""));
    rstd.fill_(std::nan(""));
    return {Y, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "layer_norm_2d_fwd_cpu", [&] {
    forward_impl<scalar_t>(a.X, a.gamma, a.beta, a.residual, eps, act, slope, Y, mean, rstd, N * HxW, C,
                           a.rows ? nullptr : &a.dims);
  });
  return {Y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_2d_fwd_cpu(const Tensor& X_in,
                                                         const c10::optional<Tensor>& gamma,
                                                         const c10::optional<Tensor>& beta,
                                                         const c10::optional<Tensor>& residual, double eps,
                                                         int64_t act, double slope) {
  return fwd_2d(check_channel_norm(X_in, gamma, beta, residual, act, "layer_norm_2d_fwd"), eps, act, slope,
                false);
}

std::tuple<Tensor, Tensor> rms_norm_2d_fwd_cpu(const Tensor& X_in, const c10::optional<Tensor>& gamma,
                                               const c10::optional<Tensor>& residual, double eps, int64_t act,
                                               double slope) {
  auto [Y, mean, rstd] = fwd_2d(
      check_channel_norm(X_in, gamma, c10::nullopt, residual, act, "rms_norm_2d_fwd"), eps, act, slope, true);
  return {Y, rstd};
}

// Channel (2d) backward of checked input; mean_in undefined: RMSNorm2d.
std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_2d(const Tensor& dY_in, const ChannelNormArgs& a,
                                                  const Tensor& mean_in, const Tensor& rstd_in, int64_t act,
                                                  double slope, std::array<bool, 4> mask, const char* op) {
  const auto [N, C, HxW] = a.dims;
  const Tensor dY = *check_like(dY_in, a.X, a.layout, "grad_output", op);
  const Tensor mean = mean_in.defined() ? check_stats(mean_in, a.X, N * HxW, "mean", op) : Tensor();
  const Tensor rstd = check_stats(rstd_in, a.X, N * HxW, "rstd", op);
  auto [dX, dgamma, dbeta, dR] = alloc_grads(a.X, {C}, mask);
  if (a.X.numel() == 0) return {dX, dgamma, dbeta, dR};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "layer_norm_2d_bwd_cpu", [&] {
    backward_impl<scalar_t>(dY, a.X, a.residual, mean, rstd, a.gamma, a.beta, act, slope, mask, dX, dgamma,
                            dbeta, dR, N * HxW, C, a.rows ? nullptr : &a.dims);
  });
  return {dX, dgamma, dbeta, dR};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_2d_bwd_cpu(
    const Tensor& dY_in, const Tensor& X_in, const c10::optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta, int64_t act,
    double slope, std::array<bool, 4> mask) {
  constexpr const char* op = "layer_norm_2d_bwd";
  return bwd_2d(dY_in, check_channel_norm(X_in, gamma, beta, residual, check_grad_activation(act, op), op),
                mean_in, rstd_in, act, slope, mask, op);
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_2d_bwd_cpu(const Tensor& dY_in, const Tensor& X_in,
                                                       const c10::optional<Tensor>& residual,
                                                       const Tensor& rstd_in,
                                                       const c10::optional<Tensor>& gamma, int64_t act,
                                                       double slope, std::array<bool, 3> mask) {
  constexpr const char* op = "rms_norm_2d_bwd";
  auto [dX, dgamma, dbeta, dR] = bwd_2d(
      dY_in, check_channel_norm(X_in, gamma, c10::nullopt, residual, check_grad_activation(act, op), op),
      Tensor(), rstd_in, act, slope, {mask[0], mask[1], false, mask[2]}, op);
  return {dX, dgamma, dR};
}

}  // namespace

// Called by csrc/cpu/dispatch.cpp when this capability's build is the one in use.
void register_layer_norm(torch::Library& m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("layer_norm_2d_fwd", &layer_norm_2d_fwd_cpu);
  m.impl("layer_norm_2d_bwd", &layer_norm_2d_bwd_cpu);
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("rms_norm_2d_fwd", &rms_norm_2d_fwd_cpu);
  m.impl("rms_norm_2d_bwd", &rms_norm_2d_bwd_cpu);
  m.impl("add_layer_norm_fwd", &add_layer_norm_fwd_cpu);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_cpu);
}

}  // namespace normext::cpu::CPU_CAPABILITY
