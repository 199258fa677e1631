// Math shared by the CPU and CUDA kernels: activation forward/derivative and Welford/Chan moments.
// The activation and Welford functions are templates over the value type, so the CPU path
// instantiates them with at::vec::Vectorized<float> as well as float/double, and CUDA with float.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NORMEXT_HD __host__ __device__ __forceinline__
#else
// Forced so that a compile-time activation code folds the switch inside SIMD loops.
#define NORMEXT_HD inline __attribute__((always_inline))
#endif

namespace normext {

// Activation codes; the Python side (normext/_ops.py ACTIVATIONS) uses the same numbers.
enum Activation : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,
  kSilu = 3,
  kGelu = 4,
  kGeluTanh = 5,
  kNumActivations = 6,
};

// Scalar primitives. The CPU vector header overloads the same names for Vectorized<T>, which is what
// lets act_forward/act_grad below be written once.
NORMEXT_HD float nx_exp(float x) { return expf(x); }
NORMEXT_HD double nx_exp(double x) { return exp(x); }
NORMEXT_HD float nx_erf(float x) { return erff(x); }
NORMEXT_HD double nx_erf(double x) { return erf(x); }
NORMEXT_HD float nx_tanh(float x) { return tanhf(x); }
NORMEXT_HD double nx_tanh(double x) { return tanh(x); }
// relu that propagates NaN like torch.relu (a plain max(x, 0) may return 0 for NaN).
NORMEXT_HD float nx_relu(float x) { return (x > 0.f || x != x) ? x : 0.f; }
NORMEXT_HD double nx_relu(double x) { return (x > 0.0 || x != x) ? x : 0.0; }
// pos_select(z, a, b) = z > 0 ? a : b; NaN in z selects b, as torch's relu/leaky_relu backward do.
NORMEXT_HD float nx_pos_select(float z, float a, float b) { return z > 0.f ? a : b; }
NORMEXT_HD double nx_pos_select(double z, double a, double b) { return z > 0.0 ? a : b; }
// a / b. The CUDA kernels' float version (and the emulated build's, which runs the same sequence) is a times
// 1/b refined once from the hardware's approximate reciprocal, within an ulp of the IEEE quotient: the IEEE
// division's slow-path subroutine call makes ptxas save live registers around it, which it reports as spills
// (tools/cuda_report.py). Special values as IEEE: 1/±0 = ±inf, 1/±inf = ±0, NaN stays NaN; a |b| below
// FLT_MIN counts as 0 and a 1/b below FLT_MIN is flushed to 0. The CPU path divides.
#if defined(__CUDACC__) || defined(NORMEXT_CUDA_EMU)
NORMEXT_HD float nx_recip(float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
#else
  const float r = 1.f / b;
#endif
  // |e| is about 2^-23 for a finite nonzero r; NaN or |e| >= 1 where r is ±inf, ±0 or NaN, which is final.
  const float e = fmaf(-b, r, 1.f);
  return fabsf(e) < 1.f ? fmaf(r, e, r) : r;
}
NORMEXT_HD float nx_div(float a, float b) { return a * nx_recip(b); }
#else
NORMEXT_HD float nx_recip(float b) { return 1.f / b; }
NORMEXT_HD float nx_div(float a, float b) { return a / b; }
#endif
NORMEXT_HD double nx_recip(double b) { return 1.0 / b; }
NORMEXT_HD double nx_div(double a, double b) { return a / b; }

}  // namespace normext

#if !defined(__CUDACC__) && !defined(__HIPCC__)
#include <ATen/cpu/vec/vec.h>

namespace normext {
// The same primitives on CPU SIMD vectors (lane-wise; maximum propagates NaN like torch.relu).
template <typename T>
inline at::vec::Vectorized<T> nx_exp(const at::vec::Vectorized<T>& x) {
  return x.exp();
}
template <typename T>
inline at::vec::Vectorized<T> nx_erf(const at::vec::Vectorized<T>& x) {
  return x.erf();
}
template <typename T>
inline at::vec::Vectorized<T> nx_tanh(const at::vec::Vectorized<T>& x) {
  return x.tanh();
}
template <typename T>
inline at::vec::Vectorized<T> nx_relu(const at::vec::Vectorized<T>& x) {
  return at::vec::maximum(x, at::vec::Vectorized<T>(T(0)));
}
template <typename T>
inline at::vec::Vectorized<T> nx_div(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return a / b;
}
template <typename T>
inline at::vec::Vectorized<T> nx_pos_select(const at::vec::Vectorized<T>& z, const at::vec::Vectorized<T>& a,
                                            const at::vec::Vectorized<T>& b) {
  return at::vec::Vectorized<T>::blendv(b, a, z > at::vec::Vectorized<T>(T(0)));
}
}  // namespace normext
#endif

namespace normext {

template <typename T, typename S>
NORMEXT_HD T act_forward(T z, int64_t act, S slope) {
  const T one(S(1)), half(S(0.5));
  switch (act) {
    case kRelu:
      return nx_relu(z);
    case kLeakyRelu:
      return nx_pos_select(z, z, z * T(slope));
    case kSilu:
      return nx_div(z, one + nx_exp(T(S(0)) - z));
    case kGelu:
      return z * half * (one + nx_erf(z * T(S(0.70710678118654752440))));
    case kGeluTanh: {
      const T inner = T(S(0.79788456080286535588)) * (z + T(S(0.044715)) * z * z * z);
      return z * half * (one + nx_tanh(inner));
    }
    default:
      return z;
  }
}

// d act(z) / dz, evaluated at the pre-activation z (recomputed in backward, never saved).
template <typename T, typename S>
NORMEXT_HD T act_grad(T z, int64_t act, S slope) {
  const T one(S(1)), half(S(0.5));
  switch (act) {
    case kRelu:
      return nx_pos_select(z, one, T(S(0)));
    case kLeakyRelu:
      return nx_pos_select(z, one, T(slope));
    case kSilu: {
      const T s = nx_div(one, one + nx_exp(T(S(0)) - z));
      return s * (one + z * (one - s));
    }
    case kGelu: {
      const T cdf = half * (one + nx_erf(z * T(S(0.70710678118654752440))));
      const T pdf = T(S(0.39894228040143267794)) * nx_exp(z * z * T(S(-0.5)));
      return cdf + z * pdf;
    }
    case kGeluTanh: {
      const T k(S(0.79788456080286535588)), c(S(0.044715));
      const T z2 = z * z;
      const T t = nx_tanh(k * (z + c * z2 * z));
      return half * (one + t) + half * z * (one - t * t) * k * (one + T(S(3)) * c * z2);
    }
    default:
      return one;
  }
}

// What a norm divides by (under the square root, before eps): the biased variance var (LayerNorm), or
// for RMSNorm (rms) the mean square about zero, var + mean² (both terms >= 0, so nothing cancels, and
// one set of Welford moments serves both norms).
template <typename T>
NORMEXT_HD T norm_var(T mean, T var, bool rms) {
  return rms ? var + mean * mean : var;
}

// Running moments of a set of values: count n, mean, and M2 = sum((x - mean)^2). T may be a vector
// of lanes that all saw the same number of values, so the count is a separate scalar type C.
template <typename T, typename C>
struct Welford {
  T mean;
  T m2;
  C n;
};

template <typename T, typename C>
NORMEXT_HD void welford_push(Welford<T, C>& w, T x) {
  w.n += C(1);
  const T delta = x - w.mean;
  w.mean = w.mean + delta * T(nx_recip(w.n));
  w.m2 = w.m2 + delta * (x - w.mean);
}

// Chan et al.: merge two disjoint sets. Exact for empty sides (n == 0) and stable when the means
// are far apart relative to the spread, which E[x^2] - E[x]^2 is not.
template <typename T, typename C>
NORMEXT_HD Welford<T, C> welford_merge(const Welford<T, C>& a, const Welford<T, C>& b) {
  const C n = a.n + b.n;
  const C wb = n > C(0) ? nx_div(b.n, n) : C(0);
  const T delta = b.mean - a.mean;
  Welford<T, C> r;
  r.mean = a.mean + delta * T(wb);
  r.m2 = a.m2 + b.m2 + delta * delta * T(a.n * wb);
  r.n = n;
  return r;
}

}  // namespace normext
