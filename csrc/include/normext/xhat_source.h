// Where a backward kernel takes x̂ from: the input x, or (memory_efficient) the forward's output y, from
// which x̂ is recovered. Shared by the CPU and CUDA backward kernels: each computes x̂ and dz through these.
#pragma once

#include <cstdint>

#include "normext/math.h"

namespace normext {

// Or-ed into the activation code of a backward op: X holds the forward's output y = act(x̂·γ + β + r)
// instead of x. act is then the identity or leaky_relu with slope > 0, both invertible with act'(z) read
// off y's sign; relu is allowed too where only dz is needed, never x̂ (BatchNorm with constant statistics).
constexpr int64_t kFromOutput = 8;

NORMEXT_HD constexpr bool from_output(int64_t act) { return (act & kFromOutput) != 0; }
NORMEXT_HD constexpr int64_t base_activation(int64_t act) { return act & ~kFromOutput; }

// x̂ = (v − m)·p of the element (or SIMD vector) u the backward read. From the input: v = u = x, with
// m = mean, p = rstd. From the output: v = act⁻¹(u) − r (r the residual, 0 without one), with m = β,
// p = 1/γ. The caller picks (m, p); the input case is the kernels' original (x − mean)·rstd, exactly.
template <typename T, typename S>
NORMEXT_HD T xhat_of(T u, T r, T m, T p, int64_t act, S slope) {
  if (!from_output(act)) return (u - m) * p;
  if (base_activation(act) == kLeakyRelu) u = nx_pos_select(u, u, u * T(nx_recip(slope)));
  return (u - r - m) * p;
}

// xhat_of with (m, p) picked per element (scalar T): the input's (mean, rstd), or the output's (β, 1/γ). 1/γ
// is taken as 0 for γ = 0, where x̂ is unrecoverable: the callers that need x̂ are never given such a weight
// (normext/_autograd.py check_recoverable refuses it), the ones that do not (BatchNorm's dx with constant
// statistics) multiply x̂ by 0, which must then stay finite.
template <typename T, typename S>
NORMEXT_HD T xhat_from(T u, T r, T mean, T rstd, T g, T b, int64_t act, S slope) {
  if (!from_output(act)) return xhat_of(u, r, mean, rstd, act, slope);
  return xhat_of(u, r, b, g != T(S(0)) ? nx_div(T(S(1)), g) : T(S(0)), act, slope);
}

// dz = dy·act'(z), the gradient at the pre-activation: z = x̂·γ + β + r recomputed from x̂, or, from the
// output, act'(z) taken at y = u (same sign as z for the activations allowed there).
template <typename T, typename S>
NORMEXT_HD T grad_pre_act(T dy, T u, T xhat, T g, T b, T r, int64_t act, S slope) {
  const int64_t base = base_activation(act);
  if (base == kIdentity) return dy;
  return dy * act_grad(from_output(act) ? u : xhat * g + b + r, base, slope);
}

}  // namespace normext
