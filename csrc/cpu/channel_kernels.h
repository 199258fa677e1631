// CPU passes shared by every norm whose statistics are per (sample, channel) or per channel
// (GroupNorm, InstanceNorm, BatchNorm): per-(n,c) moments, the normalize+affine+activation apply,
// the backward per-(n,c) sums and the backward elementwise pass. Both layouts are native:
// channels-first walks contiguous HxW runs of one channel, channels-last walks runs of C channels.
#pragma once

#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_utils.h"

namespace normext::cpu::CPU_CAPABILITY {

struct ChannelShape {
  int64_t N, C, HxW;
  bool channels_last;
};

// Statistics and parameters of channel (n, c): x̂ = (x - mean)·rstd, z = x̂·gamma + beta + residual.
// A backward from the output (kFromOutput) holds beta and 1/gamma in mean and rstd (xhat_source.h).
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

// (m, p) of x̂ = (v − m)·p for one channel: (mean, rstd), or, in a backward from the output, (β, 1/γ)
// (zeros for relu, whose x̂ is never used).
template <typename acc_t>
std::pair<acc_t, acc_t> xhat_coef(int64_t act, acc_t mean, acc_t rstd, acc_t gamma, acc_t beta) {
  if (!from_output(act)) return {mean, rstd};
  if (base_activation(act) == kRelu) return {acc_t(0), acc_t(0)};
  return {beta, acc_t(1) / gamma};
}

// xhat_coef per statistic index i < count (channel i % C), written to `store` in a backward from the
// output.
template <typename acc_t>
std::pair<const acc_t*, const acc_t*> xhat_coefs(int64_t act, const acc_t* mean, const acc_t* rstd,
                                                 int64_t count, int64_t C, const acc_t* gamma,
                                                 const acc_t* beta, std::vector<acc_t>& store) {
  if (!from_output(act)) return {mean, rstd};
  store.resize(2 * count);
  for (int64_t i = 0; i < count; ++i) {
    std::tie(store[i], store[count + i]) = xhat_coef(act, mean[i], rstd[i], gamma[i % C], beta[i % C]);
  }
  return {store.data(), store.data() + count};
}

// Backward elementwise coefficients, indexed like mean/rstd: dx = a·dz + b·x̂ + c.
template <typename acc_t>
struct GradCoefs {
  const acc_t* a;
  const acc_t* b;
  const acc_t* c;
};

// A run of elements of one sample: the HxW elements of channel `chan` (channels-first).
struct Run {
  int64_t offset;  // element offset of the run in X
  int64_t count;   // elements in the run (HxW)
  int64_t stat;    // index of the run's channel in mean/rstd
  int64_t chan;    // channel of the run
};

// Calls body(run) for every channels-first run of X, in parallel.
template <typename Body>
void for_each_run(const ChannelShape& s, int64_t stat_stride, const Body& body) {
  at::parallel_for(0, s.N * s.C, grain_for(s.HxW), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / s.C, c = nc % s.C;
      body(Run{nc * s.HxW, s.HxW, n * stat_stride + c, c});
    }
  });
}

// Calls f(Vec(0), j, count) over n elements: whole SIMD vectors (count = WholeVec{}), then one partial
// vector of the last n % kSize (count = their number: loads fill the other lanes with 0, stores leave
// them out). Element at a time, the 6-element tail of a 70-element plane made a float16 apply about 3x slower
// per element than on 64-element planes.
template <typename scalar_t, typename F>
inline void for_vectors(int64_t n, const F& f) {
  using IO = VecIO<scalar_t>;
  int64_t j = 0;
  for (; j + IO::kSize <= n; j += IO::kSize) f(typename IO::Vec(0), j, WholeVec{});
  if (j < n) f(typename IO::Vec(0), j, n - j);
}

// Per-channel coefficients of the consecutive channels j, j+1, ... as a T: one value (T = acc_t) or a SIMD
// load of kSize of them (or count, see for_vectors).
template <typename T, typename acc_t, typename Count = WholeVec>
inline T coef(const acc_t* p, int64_t j, Count count = {}) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return p[j];
  } else if constexpr (std::is_same_v<Count, WholeVec>) {
    return T::loadu(p + j);
  } else {
    return T::loadu(p + j, count);
  }
}

// One element (T = acc_t) or one SIMD vector (T = Vectorized; count elements of it) of a scalar_t array
// as T.
template <typename scalar_t, typename T, typename Count = WholeVec>
inline T load_as(const scalar_t* p, Count count = {}) {
  if constexpr (std::is_same_v<T, at::opmath_type<scalar_t>>) {
    return T(*p);
  } else if constexpr (std::is_same_v<Count, WholeVec>) {
    return VecIO<scalar_t>::load(p);
  } else {
    return VecIO<scalar_t>::load(p, count);
  }
}

template <typename scalar_t, typename T, typename Count = WholeVec>
inline void store_as(scalar_t* p, const T& v, Count count = {}) {
  if constexpr (std::is_same_v<T, at::opmath_type<scalar_t>>) {
    *p = scalar_t(v);
  } else if constexpr (std::is_same_v<Count, WholeVec>) {
    VecIO<scalar_t>::store(p, v);
  } else {
    VecIO<scalar_t>::store(p, v, count);
  }
}

// x̂ of element o of a run, read from x, or from y with kFromOutput (then (m, p) are (β, 1/γ) and the
// residual is part of the recovery; see xhat_source.h).
template <int64_t kAct, typename scalar_t, typename T, typename acc_t, typename Count = WholeVec>
inline T xhat_at(const scalar_t* x, const scalar_t* res, int64_t o, T m, T p, acc_t slope, Count count = {}) {
  const T r = from_output(kAct) && res != nullptr ? load_as<scalar_t, T>(res + o, count) : T(acc_t(0));
  return xhat_of(load_as<scalar_t, T>(x + o, count), r, m, p, kAct, slope);
}

// x̂ and the pre-activation gradient dz = dy·act'(z) of element o, x (or y) and the residual read once.
template <int64_t kAct, typename scalar_t, typename T, typename acc_t, typename Count = WholeVec>
inline std::pair<T, T> xhat_dz(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t o, T m,
                               T p, T gamma, T beta, acc_t slope, Count count = {}) {
  const T u = load_as<scalar_t, T>(x + o, count);
  const bool need_r = (base_activation(kAct) != kIdentity || from_output(kAct)) && res != nullptr;
  const T r = need_r ? load_as<scalar_t, T>(res + o, count) : T(acc_t(0));
  const T xhat = xhat_of(u, r, m, p, kAct, slope);
  return {xhat, grad_pre_act(load_as<scalar_t, T>(dy + o, count), u, xhat, gamma, beta, r, kAct, slope)};
}

// a·b + c. Sums of more terms nest it, so each is contracted to an FMA in one way only: written as
// a·b + c·d + e, the compiler may pick either product for the FMA, differently in the SIMD and scalar copies
// of a loop (and those copies can be chosen at run time by the buffers' addresses), which made one run's
// dx differ from the next by an ulp.
template <typename T>
inline T madd(const T& a, const T& b, const T& c) {
  if constexpr (std::is_floating_point_v<T>) {
    return a * b + c;
  } else {
    return at::vec::fmadd(a, b, c);
  }
}

// The run-level kernels below work on one channel: its coefficients come by value (loop invariants the
// compiler keeps in registers; read through pointers, they would be reloaded after every may-alias store).

template <typename scalar_t, int64_t kAct, typename acc_t = at::opmath_type<scalar_t>>
void apply_run(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t n, acc_t mean, acc_t scale,
               acc_t beta, acc_t slope) {
  for_vectors<scalar_t>(n, [&](auto zero, int64_t j, auto count) {
    using T = decltype(zero);
    T z = (load_as<scalar_t, T>(x + j, count) - T(mean)) * T(scale) + T(beta);
    if (res != nullptr) z = z + load_as<scalar_t, T>(res + j, count);
    store_as<scalar_t, T>(y + j, act_forward(z, kAct, slope), count);
  });
}

// dx = ca·dz + cb·x̂ + cc and dres = dz (either may be null); (m, p) of x̂ as xhat_coef gives them.
template <typename scalar_t, int64_t kAct, typename acc_t = at::opmath_type<scalar_t>>
void grad_input_run(const scalar_t* dy, const scalar_t* x, const scalar_t* res, scalar_t* dx, scalar_t* dres,
                    int64_t n, acc_t m, acc_t p, acc_t gamma, acc_t beta, acc_t ca, acc_t cb, acc_t cc,
                    acc_t slope) {
  for_vectors<scalar_t>(n, [&](auto zero, int64_t j, auto count) {
    using T = decltype(zero);
    const auto [xhat, dz] = xhat_dz<kAct>(dy, x, res, j, T(m), T(p), T(gamma), T(beta), slope, count);
    if (dres != nullptr) store_as<scalar_t, T>(dres + j, dz, count);
    if (dx != nullptr) store_as<scalar_t, T>(dx + j, madd(T(ca), dz, madd(T(cb), xhat, T(cc))), count);
  });
}

// Σ dz and Σ dz·x̂ over one channels-first run (one channel); dz itself is also written to dz_out when
// given, so a pass after it need not evaluate the activation's derivative again.
template <typename scalar_t, int64_t kAct, typename acc_t = at::opmath_type<scalar_t>>
std::pair<acc_t, acc_t> grad_sums_run(const scalar_t* dy, const scalar_t* x, const scalar_t* res, int64_t n,
                                      acc_t mean, acc_t rstd, acc_t gamma, acc_t beta, acc_t slope,
                                      acc_t* dz_out = nullptr) {
  using Vec = typename VecIO<scalar_t>::Vec;
  Vec v_dz(0), v_dzx(0);
  for_vectors<scalar_t>(n, [&](auto zero, int64_t j, auto count) {
    using T = decltype(zero);
    const auto [xhat, dz] = xhat_dz<kAct>(dy, x, res, j, T(mean), T(rstd), T(gamma), T(beta), slope, count);
    if (dz_out != nullptr) store_as<acc_t, T>(dz_out + j, dz, count);
    if constexpr (std::is_same_v<decltype(count), WholeVec>) {
      v_dz = v_dz + dz;
      v_dzx = at::vec::fmadd(dz, xhat, v_dzx);
    } else {
      v_dz = v_dz + keep_lanes(dz, count);
      v_dzx = v_dzx + keep_lanes(dz * xhat, count);
    }
  });
  const auto add = [](Vec p, Vec q) { return p + q; };
  return {at::vec::vec_reduce_all(add, v_dz), at::vec::vec_reduce_all(add, v_dzx)};
}

// grad_input_run with dz read back from grad_sums_run's dz_out: x (or y) and the residual are read again
// for x̂, the activation's derivative is not evaluated again. Every element goes through one SIMD code
// path (for_vectors): with a scalar tail, whose loop the compiler may vectorize behind a run-time check
// of the buffers' addresses, one backward's dx differed from the next one's by an ulp.
template <typename scalar_t, int64_t kAct, typename acc_t = at::opmath_type<scalar_t>>
void grad_input_from_dz_run(const acc_t* dz, const scalar_t* x, const scalar_t* res, scalar_t* dx,
                            scalar_t* dres, int64_t n, acc_t m, acc_t p, acc_t ca, acc_t cb, acc_t cc,
                            acc_t slope) {
  for_vectors<scalar_t>(n, [&](auto zero, int64_t j, auto count) {
    using T = decltype(zero);
    const T d = load_as<acc_t, T>(dz + j, count);
    if (dres != nullptr) store_as<scalar_t, T>(dres + j, d, count);
    if (dx != nullptr) {
      const T xhat = xhat_at<kAct>(x, res, j, T(m), T(p), slope, count);
      store_as<scalar_t, T>(dx + j, madd(T(ca), d, madd(T(cb), xhat, T(cc))), count);
    }
  });
}

// ------------------------------------------------------------------ channels-last rows
// Column passes over rows of C channels (channels-last; BatchNorm's (N·HxW, C) view): SIMD across
// channels, per-channel coefficients and accumulators in arrays of C. Rows are walked in memory order
// (sequential streams the prefetcher follows; a walk down one column of channels at a time strides
// by C and crosses a page every few rows). Rows are taken kRowGroup at a time, so each load of a
// coefficient or an accumulator (and each store of one) serves kRowGroup rows: one row at a time, those
// outnumbered the loads of the data (BatchNorm's backward at C = 256: 6 to 2).

constexpr int64_t kRowGroup = 4;

// Walks the rows of [r0, r1) in groups of kRowGroup and, in each, the SIMD vectors (T = Vectorized) then the
// scalar tail (T = acc_t) of the C channels: Step::template run<T>(o, j, rows, C, args...) with o = first
// row · C + j. `rows` is a compile-time kRowGroup for full groups (so the step's row loop unrolls), an
// int64_t for the last partial one. Steps get every pointer by value, so hot loops keep them in registers.
template <typename scalar_t, typename Step, typename... Args>
inline void for_rows(int64_t r0, int64_t r1, int64_t C, Args... args) {
  using IO = VecIO<scalar_t>;
  const auto group = [&](int64_t r, auto rows) {
    int64_t j = 0;
    for (; j + IO::kSize <= C; j += IO::kSize) {
      Step::template run<typename IO::Vec>(r * C + j, j, rows, C, args...);
    }
    for (; j < C; ++j) Step::template run<typename IO::acc_t>(r * C + j, j, rows, C, args...);
  };
  int64_t r = r0;
  for (; r + kRowGroup <= r1; r += kRowGroup) group(r, std::integral_constant<int64_t, kRowGroup>{});
  if (r < r1) group(r, r1 - r);
}

// Runs body(n, r0, r1) over rows [r0, r1) of sample n, in parallel tasks of about 32k elements.
template <typename F>
void for_sample_rows(const ChannelShape& s, const F& body) {
  at::parallel_for(0, s.N * s.HxW, grain_for(s.C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t n = i / s.HxW, r0 = i % s.HxW, r1 = std::min(s.HxW, r0 + (end - i));
      body(n, r0, r1);
      i += r1 - r0;
    }
  });
}

// Adds Σd and Σd² of the rows, d = x - k[c] (k: a row of X, so the float sums scale with the spread of
// the values, not their magnitude), into s1, s2.
struct ShiftedSumsStep {
  template <typename T, typename Rows, typename scalar_t, typename acc_t>
  static void run(int64_t o, int64_t j, Rows rows, int64_t C, const scalar_t* X, const scalar_t* k, acc_t* s1,
                  acc_t* s2) {
    const T kv = load_as<scalar_t, T>(k + j);
    T a = coef<T>(s1, j), b = coef<T>(s2, j);
    for (int64_t q = 0; q < rows; ++q, o += C) {
      const T d = load_as<scalar_t, T>(X + o) - kv;
      a = a + d;
      b = madd(d, d, b);
    }
    store_as<acc_t, T>(s1 + j, a);
    store_as<acc_t, T>(s2 + j, b);
  }
};

// Y = act((x - mean)·scale + beta + R), scale = gamma·rstd per channel.
template <int64_t kAct>
struct ApplyStep {
  template <typename T, typename Rows, typename scalar_t, typename acc_t>
  static void run(int64_t o, int64_t j, Rows rows, int64_t C, const scalar_t* X, const scalar_t* R,
                  scalar_t* Y, const acc_t* mean, const acc_t* scale, const acc_t* beta, acc_t slope) {
    const T m = coef<T>(mean, j), a = coef<T>(scale, j), b = coef<T>(beta, j);
    for (int64_t q = 0; q < rows; ++q, o += C) {
      T z = madd(load_as<scalar_t, T>(X + o) - m, a, b);
      if (R != nullptr) z = z + load_as<scalar_t, T>(R + o);
      store_as<scalar_t, T>(Y + o, act_forward(z, kAct, slope));
    }
  }
};

// Adds Σdz and Σdz·x̂ of the rows into per-channel accumulators sdz, sdzx.
template <int64_t kAct>
struct GradSumsStep {
  template <typename T, typename Rows, typename scalar_t, typename acc_t>
  static void run(int64_t o, int64_t j, Rows rows, int64_t C, const scalar_t* dY, const scalar_t* X,
                  const scalar_t* R, const acc_t* mean, const acc_t* rstd, const acc_t* gamma,
                  const acc_t* beta, acc_t slope, acc_t* sdz, acc_t* sdzx) {
    const T m = coef<T>(mean, j), rs = coef<T>(rstd, j);
    const T g = coef<T>(gamma, j), b = coef<T>(beta, j);
    T a0 = coef<T>(sdz, j), a1 = coef<T>(sdzx, j);
    for (int64_t q = 0; q < rows; ++q, o += C) {
      const auto [xhat, dz] = xhat_dz<kAct>(dY, X, R, o, m, rs, g, b, slope);
      a0 = a0 + dz;
      a1 = madd(dz, xhat, a1);
    }
    store_as<acc_t, T>(sdz + j, a0);
    store_as<acc_t, T>(sdzx + j, a1);
  }
};

// dX = a·dz + b·x̂ + c and dR = dz (either may be null).
template <int64_t kAct>
struct GradInputStep {
  template <typename T, typename Rows, typename scalar_t, typename acc_t>
  static void run(int64_t o, int64_t j, Rows rows, int64_t C, const scalar_t* dY, const scalar_t* X,
                  const scalar_t* R, const acc_t* mean, const acc_t* rstd, const acc_t* gamma,
                  const acc_t* beta, const acc_t* ka, const acc_t* kb, const acc_t* kc, acc_t slope,
                  scalar_t* dX, scalar_t* dR) {
    const T m = coef<T>(mean, j), rs = coef<T>(rstd, j);
    const T g = coef<T>(gamma, j), b = coef<T>(beta, j);
    const T a = coef<T>(ka, j), bb = coef<T>(kb, j), cc = coef<T>(kc, j);
    for (int64_t q = 0; q < rows; ++q, o += C) {
      const auto [xhat, dz] = xhat_dz<kAct>(dY, X, R, o, m, rs, g, b, slope);
      if (dR != nullptr) store_as<scalar_t, T>(dR + o, dz);
      if (dX != nullptr) store_as<scalar_t, T>(dX + o, madd(a, dz, madd(bb, xhat, cc)));
    }
  }
};

// Channels-last reductions over HxW, into sum0[n·C + c] and sum1[n·C + c] (type Out): each sample's rows are
// cut into fixed chunks (RowChunks), each chunk reduced by one task into C accumulators per output (acc_t,
// zeroed by the task, so in its cache: chunk_fn(n, r0, r1, acc0, acc1)), then each sample's chunks are added
// in chunk order, so the sums do not depend on the thread count. That merge runs along the channels
// (contiguous; one channel at a time every load would stride by C), in one parallel region for both outputs,
// inline when small: a region's join can cost more than the adds.
template <typename acc_t, typename Out, typename ChunkFn>
void reduce_channels_last(const ChannelShape& s, Out* sum0, Out* sum1, const ChunkFn& chunk_fn) {
  const RowChunks rc = row_chunks(s.HxW, s.C);
  const int64_t per_n = rc.count * s.C;
  const auto part0 = std::make_unique_for_overwrite<acc_t[]>(s.N * per_n);
  const auto part1 = std::make_unique_for_overwrite<acc_t[]>(s.N * per_n);
  at::parallel_for(0, s.N * rc.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / rc.count, k = t % rc.count;
      const int64_t r0 = k * rc.rows_per_chunk, r1 = std::min(s.HxW, r0 + rc.rows_per_chunk);
      acc_t* acc0 = part0.get() + t * s.C;
      acc_t* acc1 = part1.get() + t * s.C;
      std::fill(acc0, acc0 + s.C, acc_t(0));
      std::fill(acc1, acc1 + s.C, acc_t(0));
      chunk_fn(n, r0, r1, acc0, acc1);
    }
  });
  at::parallel_for(
      0, s.N, std::max<int64_t>(1, kInlineSumElems / (2 * per_n)), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          for (const auto& [part, sum] : {std::pair{part0.get(), sum0}, std::pair{part1.get(), sum1}}) {
            Out* o = sum + n * s.C;
            std::fill(o, o + s.C, Out(0));
            for (int64_t k = 0; k < rc.count; ++k) {
              const acc_t* p = part + n * per_n + k * s.C;
              for (int64_t c = 0; c < s.C; ++c) o[c] += Out(p[c]);
            }
          }
        }
      });
}

// Moments of `count` parts of n_each values each, part i's mean and M2 at mean[i·stride], m2[i·stride]: the
// exact merge (as Chan's pairwise one), without a division per part: the mean of the means, then
// Σ M2_i + n_each·Σ (mean_i − mean)².
inline Moments merge_equal_parts(const double* mean, const double* m2, int64_t count, int64_t stride,
                                 double n_each) {
  double sum = 0.0;
  for (int64_t i = 0; i < count; ++i) sum += mean[i * stride];
  const double mu = sum / double(count);
  double q = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    const double d = mean[i * stride] - mu;
    q += m2[i * stride] + n_each * d * d;
  }
  return {mu, q, n_each * double(count)};
}

// Per-(n, c) moments over HxW (count HxW each), in double (see Moments): a row_moments per contiguous
// run (channels-first), or, channels-last, the sums of d = x - x0 and d² per fixed chunk of rows (x0 the
// sample's first row: a shift on the scale of the spread, so Σd²/n - (Σd/n)² does not cancel the way
// E[x²] - E[x]² does for off-centre data), added up in chunk order in double, one division per (n, c).
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
  reduce_channels_last<acc_t>(s, mean, m2, [&](int64_t n, int64_t r0, int64_t r1, acc_t* s1, acc_t* s2) {
    const scalar_t* xn = X + n * s.HxW * s.C;
    for_rows<scalar_t, ShiftedSumsStep>(std::max<int64_t>(r0, 1), r1, s.C, xn, xn, s1, s2);
  });
  // The shift, sample n's first row, is widened by SIMD loads into `first` so that the loop over the channels
  // vectorizes: element at a time, the 16-bit conversion and the division took most of the moments' merge.
  std::vector<acc_t> first(s.C);
  for (int64_t n = 0; n < s.N; ++n) {
    const scalar_t* x0 = X + n * s.HxW * s.C;
    for_vectors<scalar_t>(s.C, [&](auto zero, int64_t j, auto count) {
      using T = decltype(zero);
      store_as<acc_t, T>(first.data() + j, load_as<scalar_t, T>(x0 + j, count), count);
    });
    double* mn = mean + n * s.C;
    double* q = m2 + n * s.C;
    for (int64_t c = 0; c < s.C; ++c) {
      const double s1 = mn[c], ms = s1 / double(s.HxW);
      mn[c] = double(first[c]) + ms;
      q[c] = std::max(0.0, q[c] - ms * s1);
    }
  }
}

// Y = act(x̂·gamma + beta + R).
template <typename scalar_t>
void channel_apply(const scalar_t* X, const scalar_t* R, scalar_t* Y, const ChannelShape& s,
                   const ChannelCoefs<at::opmath_type<scalar_t>>& k, int64_t act, double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  if (!s.channels_last) {
    dispatch_activation(act, [&](auto A) {
      for_each_run(s, k.stat_stride, [&](const Run& r) {
        apply_run<scalar_t, decltype(A)::value>(X + r.offset, R ? R + r.offset : nullptr, Y + r.offset,
                                                r.count, k.mean[r.stat], k.rstd[r.stat] * k.gamma[r.chan],
                                                k.beta[r.chan], acc_t(slope));
      });
    });
    return;
  }
  // scale = gamma·rstd per sample (or once, for per-channel statistics) and channel.
  const int64_t samples = k.stat_stride == 0 ? 1 : s.N;
  std::vector<acc_t> scale(samples * s.C);
  for (int64_t n = 0; n < samples; ++n) {
    for (int64_t c = 0; c < s.C; ++c) scale[n * s.C + c] = k.gamma[c] * k.rstd[n * k.stat_stride + c];
  }
  dispatch_activation(act, [&](auto A) {
    for_sample_rows(s, [&](int64_t n, int64_t r0, int64_t r1) {
      const int64_t o = n * s.HxW * s.C;
      const acc_t* sc = scale.data() + (k.stat_stride == 0 ? 0 : n * s.C);
      for_rows<scalar_t, ApplyStep<decltype(A)::value>>(r0, r1, s.C, X + o, R ? R + o : nullptr, Y + o,
                                                        k.mean + n * k.stat_stride, sc, k.beta, acc_t(slope));
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
  dispatch_grad_activation(act, [&](auto A) {
    if (!s.channels_last) {
      for_each_run(s, k.stat_stride, [&](const Run& r) {
        const auto [a, b] = grad_sums_run<scalar_t, decltype(A)::value>(
            dY + r.offset, X + r.offset, R ? R + r.offset : nullptr, r.count, k.mean[r.stat], k.rstd[r.stat],
            k.gamma[r.chan], k.beta[r.chan], sl);
        const int64_t nc = r.offset / s.HxW;
        sdz[nc] = a;
        sdzx[nc] = b;
      });
      return;
    }
    reduce_channels_last<acc_t>(
        s, sdz, sdzx, [&](int64_t n, int64_t r0, int64_t r1, acc_t* cdz, acc_t* cdzx) {
          const int64_t o = n * s.HxW * s.C, st = n * k.stat_stride;
          for_rows<scalar_t, GradSumsStep<decltype(A)::value>>(r0, r1, s.C, dY + o, X + o,
                                                               R ? R + o : nullptr, k.mean + st, k.rstd + st,
                                                               k.gamma, k.beta, sl, cdz, cdzx);
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
  dispatch_grad_activation(act, [&](auto A) {
    if (!s.channels_last) {
      for_each_run(s, k.stat_stride, [&](const Run& r) {
        grad_input_run<scalar_t, decltype(A)::value>(
            dY + r.offset, X + r.offset, R ? R + r.offset : nullptr, dX ? dX + r.offset : nullptr,
            dR ? dR + r.offset : nullptr, r.count, k.mean[r.stat], k.rstd[r.stat], k.gamma[r.chan],
            k.beta[r.chan], g.a[r.stat], g.b[r.stat], g.c[r.stat], acc_t(slope));
      });
      return;
    }
    for_sample_rows(s, [&](int64_t n, int64_t r0, int64_t r1) {
      const int64_t o = n * s.HxW * s.C, st = n * k.stat_stride;
      for_rows<scalar_t, GradInputStep<decltype(A)::value>>(
          r0, r1, s.C, dY + o, X + o, R ? R + o : nullptr, k.mean + st, k.rstd + st, k.gamma, k.beta,
          g.a + st, g.b + st, g.c + st, acc_t(slope), dX ? dX + o : nullptr, dR ? dR + o : nullptr);
    });
  });
}

}  // namespace normext::cpu::CPU_CAPABILITY
