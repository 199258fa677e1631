// LayerNorm and LayerNorm2d on the CPU: host entry points registered at the CPU key.
// Rows (LayerNorm; LayerNorm2d in channels-last) are normalized one row at a time with the row kept in
// cache between its statistics and its apply; LayerNorm2d in NCHW keeps SIMD lanes along the contiguous
// spatial positions and walks the channels (a strided reduction over C, no layout copy).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "channel_kernels.h"
#include "normext/checks.h"

namespace normext::cpu {
namespace {

using at::Tensor;

// Calls f(std::integral_constant<int64_t, act>) so the activation's switch folds away at compile time
// instead of running once per vector.
template <typename F>
void with_activation(int64_t act, const F& f) {
  switch (act) {
    case kRelu:
      return f(std::integral_constant<int64_t, kRelu>{});
    case kLeakyRelu:
      return f(std::integral_constant<int64_t, kLeakyRelu>{});
    case kSilu:
      return f(std::integral_constant<int64_t, kSilu>{});
    case kGelu:
      return f(std::integral_constant<int64_t, kGelu>{});
    case kGeluTanh:
      return f(std::integral_constant<int64_t, kGeluTanh>{});
    default:
      return f(std::integral_constant<int64_t, kIdentity>{});
  }
}

// Parameter as a pointer in the accumulation type, or `fill` when absent (storage holds the fill).
template <typename acc_t>
const acc_t* param_or(const c10::optional<Tensor>& p, std::vector<acc_t>& storage, int64_t n, acc_t fill) {
  if (p.has_value()) return p->data_ptr<acc_t>();
  storage.assign(n, fill);
  return storage.data();
}

template <typename acc_t>
acc_t rstd_of(acc_t m2, int64_t n, double eps) {
  return acc_t(1) / std::sqrt(m2 / acc_t(n) + acc_t(eps));
}

// Pointers and sizes shared by the row and NCHW kernels. gamma/beta are never null (ones/zeros when
// absent); R, dY, dX, dR, dgamma/dbeta partials may be null where not used.
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

// Mean and M2 of L contiguous values in two passes over the (cached) row: the sum of x - x[0], so a
// mean far from zero keeps its low bits, then the sum of (x - mean)^2. Four accumulators hide the add
// latency; their order is fixed, so the result is deterministic.
template <typename scalar_t>
std::pair<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> row_mean_m2(const scalar_t* x, int64_t L) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  auto sum_of = [&](auto term) {
    Vec s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
    int64_t i = 0;
    for (; i + 4 * V <= L; i += 4 * V) {
      s0 = s0 + term(IO::load(x + i));
      s1 = s1 + term(IO::load(x + i + V));
      s2 = s2 + term(IO::load(x + i + 2 * V));
      s3 = s3 + term(IO::load(x + i + 3 * V));
    }
    for (; i + V <= L; i += V) s0 = s0 + term(IO::load(x + i));
    acc_t tail = 0;
    for (; i < L; ++i) tail += term(acc_t(x[i]));
    return at::vec::vec_reduce_all([](Vec a, Vec b) { return a + b; }, (s0 + s1) + (s2 + s3)) + tail;
  };
  const acc_t shift = acc_t(x[0]);
  const acc_t mean = shift + sum_of([shift](auto v) { return v - decltype(v)(shift); }) / acc_t(L);
  const acc_t m2 = sum_of([mean](auto v) {
    const auto d = v - decltype(v)(mean);
    return d * d;
  });
  return {mean, m2};
}

// Forward over M rows of D elements: y = act((x - mean)·rstd·gamma + beta + r), gamma/beta per element.
// One row per iteration of a parallel_for over rows; the row is read from memory once and re-read from
// cache by the second statistics pass and the apply.
template <typename scalar_t, int64_t kAct>
void rows_forward(const NormPtrs<scalar_t>& p, scalar_t* Y, int64_t M, int64_t D, double eps) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  at::parallel_for(0, M, grain_for(D), [&](int64_t begin, int64_t end) {
    const scalar_t* const X = p.X;
    const scalar_t* const R = p.R;
    const acc_t* const g = p.gamma;
    const acc_t* const b = p.beta;
    const acc_t slope = p.slope;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = X + row * D;
      const scalar_t* r = R != nullptr ? R + row * D : nullptr;
      scalar_t* y = Y + row * D;
      const auto [mean, m2] = row_mean_m2(x, D);
      const acc_t rstd = rstd_of(m2, D, eps);
      p.mean[row] = mean;
      p.rstd[row] = rstd;
      const Vec vm(mean), vr(rstd);
      int64_t j = 0;
      for (; j + V <= D; j += V) {
        Vec z = (IO::load(x + j) - vm) * vr * Vec::loadu(g + j) + Vec::loadu(b + j);
        if (r != nullptr) z = z + IO::load(r + j);
        IO::store(y + j, act_forward(z, kAct, slope));
      }
      for (; j < D; ++j) {
        acc_t z = (acc_t(x[j]) - mean) * rstd * g[j] + b[j];
        if (r != nullptr) z += acc_t(r[j]);
        y[j] = scalar_t(act_forward(z, kAct, slope));
      }
    }
  });
}

// Backward outputs and the dgamma/dbeta partial sums of the fixed row chunks (null when not needed).
template <typename scalar_t>
struct GradPtrs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dY;
  scalar_t* dX;
  scalar_t* dR;
  acc_t* part_dgamma;
  acc_t* part_dbeta;
};

// dz = dy·act'(z) at the recomputed pre-activation z = x̂·gamma + beta + r.
template <int64_t kAct, typename T, typename acc_t>
inline T grad_pre_activation(T dy, T xhat, T g, T b, T r, acc_t slope) {
  if constexpr (kAct == kIdentity) {
    return dy;
  } else {
    return dy * act_grad(xhat * g + b + r, kAct, slope);
  }
}

// Backward over M rows of D elements. Per row: pass A computes dz (kept in a row scratch when an
// activation makes it costly to recompute), Σ gamma·dz, Σ gamma·dz·x̂, and adds dz·x̂ and dz to the
// chunk's dgamma/dbeta partials; pass B writes dx = rstd·(gamma·dz − mean(gamma·dz) − x̂·mean(gamma·dz·x̂)).
// Rows are cut into chunks fixed by the shape (one partial row each), so the result does not depend on
// the thread count.
template <typename scalar_t, int64_t kAct>
void rows_backward(const NormPtrs<scalar_t>& p, const GradPtrs<scalar_t>& gp, int64_t M, int64_t D) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kSize;
  constexpr bool kScratch = kAct != kIdentity;
  const RowChunks rc = row_chunks(M, D);
  at::parallel_for(0, rc.count, 1, [&](int64_t begin, int64_t end) {
    const scalar_t* const X = p.X;
    const scalar_t* const R = p.R;
    const scalar_t* const dY = gp.dY;
    const acc_t* const g = p.gamma;
    const acc_t* const b = p.beta;
    const acc_t slope = p.slope;
    const acc_t inv_d = acc_t(1) / acc_t(D);
    std::vector<acc_t> scratch(kScratch ? D : 0);
    acc_t* const dz_row = scratch.data();
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* const pg = gp.part_dgamma != nullptr ? gp.part_dgamma + chunk * D : nullptr;
      acc_t* const pb = gp.part_dbeta != nullptr ? gp.part_dbeta + chunk * D : nullptr;
      if (pg != nullptr) std::fill(pg, pg + D, acc_t(0));
      if (pb != nullptr) std::fill(pb, pb + D, acc_t(0));
      const int64_t r0 = chunk * rc.rows_per_chunk, r1 = std::min(M, r0 + rc.rows_per_chunk);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t o = row * D;
        const scalar_t* x = X + o;
        const scalar_t* dy = dY + o;
        const scalar_t* r = R != nullptr ? R + o : nullptr;
        scalar_t* dr = gp.dR != nullptr ? gp.dR + o : nullptr;
        const acc_t mean = p.mean[row], rstd = p.rstd[row];
        const Vec vm(mean), vr(rstd);
        Vec s1(acc_t(0)), s2(acc_t(0));
        acc_t t1 = 0, t2 = 0;
        int64_t j = 0;
        for (; j + V <= D; j += V) {
          const Vec xhat = (IO::load(x + j) - vm) * vr;
          const Vec gj = Vec::loadu(g + j);
          const Vec rj = r != nullptr ? IO::load(r + j) : Vec(acc_t(0));
          const Vec dz = grad_pre_activation<kAct>(IO::load(dy + j), xhat, gj, Vec::loadu(b + j), rj, slope);
          if constexpr (kScratch) dz.store(dz_row + j);
          if (dr != nullptr) IO::store(dr + j, dz);
          const Vec gdz = gj * dz;
          s1 = s1 + gdz;
          s2 = s2 + gdz * xhat;
          if (pg != nullptr) (Vec::loadu(pg + j) + dz * xhat).store(pg + j);
          if (pb != nullptr) (Vec::loadu(pb + j) + dz).store(pb + j);
        }
        for (; j < D; ++j) {
          const acc_t xhat = (acc_t(x[j]) - mean) * rstd;
          const acc_t rj = r != nullptr ? acc_t(r[j]) : acc_t(0);
          const acc_t dz = grad_pre_activation<kAct>(acc_t(dy[j]), xhat, g[j], b[j], rj, slope);
          if constexpr (kScratch) dz_row[j] = dz;
          if (dr != nullptr) dr[j] = scalar_t(dz);
          t1 += g[j] * dz;
          t2 += g[j] * dz * xhat;
          if (pg != nullptr) pg[j] += dz * xhat;
          if (pb != nullptr) pb[j] += dz;
        }
        if (gp.dX == nullptr) continue;
        auto add = [](Vec a, Vec c) { return a + c; };
        const acc_t c1 = (at::vec::vec_reduce_all(add, s1) + t1) * inv_d;
        const acc_t c2 = (at::vec::vec_reduce_all(add, s2) + t2) * inv_d;
        const Vec vc1(c1), vc2(c2);
        scalar_t* dx = gp.dX + o;
        j = 0;
        for (; j + V <= D; j += V) {
          const Vec xhat = (IO::load(x + j) - vm) * vr;
          const Vec dz = kScratch ? Vec::loadu(dz_row + j) : IO::load(dy + j);
          IO::store(dx + j, vr * (Vec::loadu(g + j) * dz - vc1 - xhat * vc2));
        }
        for (; j < D; ++j) {
          const acc_t xhat = (acc_t(x[j]) - mean) * rstd;
          const acc_t dz = kScratch ? dz_row[j] : acc_t(dy[j]);
          dx[j] = scalar_t(rstd * (g[j] * dz - c1 - xhat * c2));
        }
      }
    }
  });
}

// out[j] = Σ_k part[k·D + j] over the `count` partial rows, in k order (deterministic).
template <typename acc_t>
void sum_partials(const acc_t* part, int64_t count, int64_t D, acc_t* out) {
  at::parallel_for(0, D, grain_for(count), [&](int64_t begin, int64_t end) {
    std::fill(out + begin, out + end, acc_t(0));
    for (int64_t k = 0; k < count; ++k) {
      const acc_t* src = part + k * D;
      for (int64_t j = begin; j < end; ++j) out[j] += src[j];
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
// its low bits); writes them to the statistics and returns them in m / rs.
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
  const T var_eps = T(acc_t(eps));
  const T inv_c(acc_t(1) / acc_t(C));
  for (int64_t l = 0; l < nl; ++l) {
    m[l] = m[l] + shift[l];
    if constexpr (W == 1) {
      rs[l] = rstd_of(q[l], C, eps);
    } else {
      rs[l] = (q[l] * inv_c + var_eps).rsqrt();
    }
    store_as<acc_t, T>(mean_out + l * W, m[l]);
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
  lanes_moments<T>(p.X + base, nl, s.C, s.HxW, eps, m, rs, p.mean + stat, p.rstd + stat);
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
// dz is kept in `scratch` (C·nl lanes) when an activation makes it costly to recompute.
template <typename T, typename scalar_t, int64_t kAct>
void block_2d_backward(const NormPtrs<scalar_t>& p, const GradPtrs<scalar_t>& gp, const Block2d& s, int64_t n,
                       int64_t p0, int64_t nl, at::opmath_type<scalar_t>* pg, at::opmath_type<scalar_t>* pb,
                       at::opmath_type<scalar_t>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = lanes_of<T, scalar_t>();
  constexpr int64_t L = max_lanes<T, scalar_t>();
  constexpr bool kScratch = kAct != kIdentity;
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
    m[l] = load_as<acc_t, T>(p.mean + stat + l * W);
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
    const T g(p.gamma[c]), b(p.beta[c]);
    T dzx(acc_t(0)), dzs(acc_t(0));
    for (int64_t l = 0; l < nl; ++l) {
      const int64_t e = o + l * W;
      const T xhat = (load_as<scalar_t, T>(X + e) - m[l]) * rs[l];
      const T r = R != nullptr ? load_as<scalar_t, T>(R + e) : T(acc_t(0));
      const T dz = grad_pre_activation<kAct>(load_as<scalar_t, T>(dY + e), xhat, g, b, r, slope);
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
    s1[l] = s1[l] * inv_c;
    s2[l] = s2[l] * inv_c;
  }
  for (int64_t c = 0; c < s.C; ++c) {
    const int64_t o = base + c * s.HxW;
    const T g(p.gamma[c]);
    for (int64_t l = 0; l < nl; ++l) {
      const int64_t e = o + l * W;
      const T xhat = (load_as<scalar_t, T>(X + e) - m[l]) * rs[l];
      const T dz = kScratch ? load_as<acc_t, T>(scratch + (c * nl + l) * W) : load_as<scalar_t, T>(dY + e);
      store_as<scalar_t, T>(gp.dX + e, rs[l] * (g * dz - s1[l] - xhat * s2[l]));
    }
  }
}

// Tasks as in the forward; each task owns one C-element dgamma/dbeta partial row, summed in task order.
template <typename scalar_t, int64_t kAct>
void nchw_backward(const NormPtrs<scalar_t>& p, const GradPtrs<scalar_t>& gp, const Block2d& s) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, s.N * s.per_n, grain_for(s.C * s.block), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kAct != kIdentity ? s.C * s.block : 0);
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

// Rows or NCHW-2d forward into Y (allocated like X); mean/rstd hold one value per row / position.
template <typename scalar_t>
void forward_impl(const Tensor& X, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
                  const c10::optional<Tensor>& residual, double eps, int64_t act, double slope, Tensor& Y,
                  Tensor& mean, Tensor& rstd, int64_t M, int64_t D, const ChannelDims* nchw) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> ones, zeros;
  const NormPtrs<scalar_t> p{X.const_data_ptr<scalar_t>(),
                             residual ? residual->const_data_ptr<scalar_t>() : nullptr,
                             param_or(gamma, ones, D, acc_t(1)),
                             param_or(beta, zeros, D, acc_t(0)),
                             mean.data_ptr<acc_t>(),
                             rstd.data_ptr<acc_t>(),
                             acc_t(slope)};
  scalar_t* y = Y.data_ptr<scalar_t>();
  with_activation(act, [&](auto kAct) {
    if (nchw != nullptr) {
      nchw_forward<scalar_t, decltype(kAct)::value>(p, y, blocks_2d<scalar_t>(*nchw), eps);
    } else {
      rows_forward<scalar_t, decltype(kAct)::value>(p, y, M, D, eps);
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
                             mean.data_ptr<acc_t>(),
                             rstd.data_ptr<acc_t>(),
                             acc_t(slope)};
  const Block2d s = nchw != nullptr ? blocks_2d<scalar_t>(*nchw) : Block2d{};
  const int64_t parts = nchw != nullptr ? s.N * s.per_n : row_chunks(M, D).count;
  std::vector<acc_t> part_g(mask[1] ? parts * D : 0), part_b(mask[2] ? parts * D : 0);
  const GradPtrs<scalar_t> gp{dY.const_data_ptr<scalar_t>(), mask[0] ? dX.data_ptr<scalar_t>() : nullptr,
                              mask[3] ? dR.data_ptr<scalar_t>() : nullptr, mask[1] ? part_g.data() : nullptr,
                              mask[2] ? part_b.data() : nullptr};
  with_activation(act, [&](auto kAct) {
    if (nchw != nullptr) {
      nchw_backward<scalar_t, decltype(kAct)::value>(p, gp, s);
    } else {
      rows_backward<scalar_t, decltype(kAct)::value>(p, gp, M, D);
    }
  });
  if (mask[1]) sum_partials(part_g.data(), parts, D, dgamma.data_ptr<acc_t>());
  if (mask[2]) sum_partials(part_b.data(), parts, D, dbeta.data_ptr<acc_t>());
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& X_in, const c10::optional<Tensor>& gamma,
                                                      const c10::optional<Tensor>& beta,
                                                      const c10::optional<Tensor>& residual,
                                                      at::IntArrayRef normalized_shape, double eps,
                                                      int64_t act, double slope) {
  const auto a = check_layer_norm(X_in, normalized_shape, gamma, beta, residual, act, "layer_norm_fwd");
  Tensor Y = at::empty_like(a.X);
  Tensor mean = at::empty(a.stat_shape, a.X.options().dtype(acc_dtype(a.X)));
  Tensor rstd = at::empty_like(mean);
  if (a.M == 0) return {Y, mean, rstd};
  if (a.D == 0) {
    mean.fill_(std::nan(""));
    rstd.fill_(std::nan(""));
    return {Y, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "layer_norm_fwd_cpu", [&] {
    forward_impl<scalar_t>(a.X, a.gamma, a.beta, a.residual, eps, act, slope, Y, mean, rstd, a.M, a.D,
                           nullptr);
  });
  return {Y, mean, rstd};
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

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_bwd_cpu(
    const Tensor& dY_in, const Tensor& X_in, const c10::optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta,
    at::IntArrayRef normalized_shape, int64_t act, double slope, std::array<bool, 4> mask) {
  constexpr const char* op = "layer_norm_bwd";
  const auto a = check_layer_norm(X_in, normalized_shape, gamma, beta, residual, act, op);
  const Tensor dY = *check_like(dY_in, a.X, Layout::kChannelsFirst, "grad_output", op);
  const Tensor mean = check_stats(mean_in, a.X, a.M, "mean", op);
  const Tensor rstd = check_stats(rstd_in, a.X, a.M, "rstd", op);
  auto [dX, dgamma, dbeta, dR] = alloc_grads(a.X, normalized_shape, mask);
  if (a.X.numel() == 0) return {dX, dgamma, dbeta, dR};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "layer_norm_bwd_cpu", [&] {
    backward_impl<scalar_t>(dY, a.X, a.residual, mean, rstd, a.gamma, a.beta, act, slope, mask, dX, dgamma,
                            dbeta, dR, a.M, a.D, nullptr);
  });
  return {dX, dgamma, dbeta, dR};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_2d_fwd_cpu(const Tensor& X_in,
                                                         const c10::optional<Tensor>& gamma,
                                                         const c10::optional<Tensor>& beta,
                                                         const c10::optional<Tensor>& residual, double eps,
                                                         int64_t act, double slope) {
  const auto a = check_layer_norm_2d(X_in, gamma, beta, residual, act, "layer_norm_2d_fwd");
  const auto [N, C, HxW] = a.dims;
  Tensor Y = at::empty_like(a.X);
  Tensor mean = at::empty({N, HxW}, a.X.options().dtype(acc_dtype(a.X)));
  Tensor rstd = at::empty_like(mean);
  if (N * HxW == 0) return {Y, mean, rstd};
  if (C == 0) {
    mean.fill_(std::nan(""));
    rstd.fill_(std::nan(""));
    return {Y, mean, rstd};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "layer_norm_2d_fwd_cpu", [&] {
    forward_impl<scalar_t>(a.X, a.gamma, a.beta, a.residual, eps, act, slope, Y, mean, rstd, N * HxW, C,
                           a.rows ? nullptr : &a.dims);
  });
  return {Y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_2d_bwd_cpu(
    const Tensor& dY_in, const Tensor& X_in, const c10::optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& beta, int64_t act,
    double slope, std::array<bool, 4> mask) {
  constexpr const char* op = "layer_norm_2d_bwd";
  const auto a = check_layer_norm_2d(X_in, gamma, beta, residual, act, op);
  const auto [N, C, HxW] = a.dims;
  const Tensor dY = *check_like(dY_in, a.X, a.layout, "grad_output", op);
  const Tensor mean = check_stats(mean_in, a.X, N * HxW, "mean", op);
  const Tensor rstd = check_stats(rstd_in, a.X, N * HxW, "rstd", op);
  auto [dX, dgamma, dbeta, dR] = alloc_grads(a.X, {C}, mask);
  if (a.X.numel() == 0) return {dX, dgamma, dbeta, dR};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.X.scalar_type(), "layer_norm_2d_bwd_cpu", [&] {
    backward_impl<scalar_t>(dY, a.X, a.residual, mean, rstd, a.gamma, a.beta, act, slope, mask, dX, dgamma,
                            dbeta, dR, N * HxW, C, a.rows ? nullptr : &a.dims);
  });
  return {dX, dgamma, dbeta, dR};
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
  m.impl("layer_norm_2d_fwd", &layer_norm_2d_fwd_cpu);
  m.impl("layer_norm_2d_bwd", &layer_norm_2d_bwd_cpu);
}

}  // namespace normext::cpu
