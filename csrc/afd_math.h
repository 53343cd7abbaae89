// Per-element math of the fused losses, shared by the CPU kernels (ops_cpu.cpp) and the CUDA
// kernels (cuda/ops_cuda.cu), so the CPU tests exercise exactly the formulas the GPU runs.
//
// Notation (docs/design.md §1, §4): z_m = logits of row m for one sample, T = temperature,
// p_m = softmax(z_m), q_m = softmax(z_m / T), W = peer weights [K, M].
//   CE_k       = lse(z_k) - (1 - eps) <t, z_k> - eps * mean_c z_k[c]        (label smoothing eps)
//   KL_k       = sum_j W[k, j] sum_c q_j[c] (log q_j[c] - log q_k[c])
//   loss_k     = ce_w * CE_k + kd_w * T^2 * KL_k                            (batch means)
//   dloss_k/dz = ce_w * (p_k - (1 - eps) t - eps / C) + kd_w * T * (S_k q_k - sum_j W[k, j] q_j)
// with S_k = sum_j W[k, j] and t the sample's target distribution: onehot(y), or for mixup/CutMix
// lam * onehot(a) + (1 - lam) * onehot(b) (a hard target is a = b = y, lam = 1). Teachers q_j are
// constants (detached), which is what makes the gradient of row k depend only on loss_k.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AFD_HD __host__ __device__ __forceinline__
#else
// static: each CPU translation unit (one per instruction set, see cpu_kernels.h) keeps its own copy.
#define AFD_HD static inline
#endif

namespace afd {

AFD_HD int32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  return __builtin_bit_cast(int32_t, f);  // not memcpy: that keeps GCC from vectorising
#endif
}

AFD_HD float bits_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  return __builtin_bit_cast(float, i);
#endif
}

// exp(x) for x <= 0, the only arguments a max-shifted softmax needs. Cody-Waite reduction and the
// Cephes degree-6 polynomial (about 1 ulp); no library call, so compilers vectorise loops around
// it on the CPU, and the GPU computes the very same values. Underflows to 0 below -87, NaN stays
// NaN (comparisons with NaN are false), positive arguments are clamped to 0 (exp = 1).
AFD_HD float exp_nonpos(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the mantissa
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 0.0f ? 0.0f : xc;
  const float shifted = xc * kLog2e + kRound;
  const float n = shifted - kRound;
  const int32_t n_int = float_bits(shifted) - float_bits(kRound);
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float y = p * bits_float((n_int + 127) << 23);
  return x < -87.0f ? 0.0f : y;
}

AFD_HD double exp_nonpos(double x) { return ::exp(x); }

// Numerically stable logistic function, through exp of a non-positive argument only.
template <typename acc_t>
AFD_HD acc_t sigmoid(acc_t x) {
  const acc_t e = exp_nonpos(x > acc_t(0) ? -x : x);
  const acc_t one = acc_t(1);
  return x > acc_t(0) ? one / (one + e) : e / (one + e);
}

// Running statistics of one row, read once in any order (the GPU kernel's single pass):
// max, sum exp(z - max), sum exp((z - max) / T) and sum z (for label smoothing).
template <typename acc_t>
struct OnlineRowStats {
  acc_t max, sum1, sum_t, sum_z;
};

template <typename acc_t>
AFD_HD OnlineRowStats<acc_t> online_row_stats_empty() {
  return {-INFINITY, acc_t(0), acc_t(0), acc_t(0)};
}

// exp(a - b) for a <= b: exactly 1 when a == b, also when both are -inf (an empty state) where
// the difference would be NaN; but NaN when both are +inf, as exp(z - max) of the two-pass CPU
// kernels is there, so a +inf logit makes its whole row NaN on every device. NaN stays NaN.
template <typename acc_t>
AFD_HD acc_t exp_diff(acc_t a, acc_t b, acc_t inv_t) {
  if (a == b) return a == acc_t(INFINITY) ? acc_t(NAN) : acc_t(1);
  return exp_nonpos((a - b) * inv_t);
}

template <typename acc_t>
AFD_HD void online_row_stats_add(OnlineRowStats<acc_t>& s, acc_t z, acc_t inv_t) {
  s.sum_z += z;
  if (z > s.max) {
    s.sum1 = s.sum1 * exp_diff(s.max, z, acc_t(1)) + exp_diff(z, z, acc_t(1));
    s.sum_t = s.sum_t * exp_diff(s.max, z, inv_t) + exp_diff(z, z, inv_t);
    s.max = z;
  } else {
    s.sum1 += exp_diff(z, s.max, acc_t(1));
    s.sum_t += exp_diff(z, s.max, inv_t);
  }
}

template <typename acc_t>
AFD_HD OnlineRowStats<acc_t> online_row_stats_merge(const OnlineRowStats<acc_t>& a,
                                                    const OnlineRowStats<acc_t>& b, acc_t inv_t) {
  const acc_t mx = b.max > a.max ? b.max : a.max;
  return {mx, a.sum1 * exp_diff(a.max, mx, acc_t(1)) + b.sum1 * exp_diff(b.max, mx, acc_t(1)),
          a.sum_t * exp_diff(a.max, mx, inv_t) + b.sum_t * exp_diff(b.max, mx, inv_t),
          a.sum_z + b.sum_z};
}

// Cross-entropy of one sample from its row statistics: lse = max + log(sum exp(z - max)).
template <typename acc_t>
AFD_HD acc_t cross_entropy(acc_t lse, acc_t z_target, acc_t mean_z, acc_t eps) {
  return lse - (acc_t(1) - eps) * z_target - eps * mean_z;
}

// <t, z> of a soft target t = lam * onehot(a) + (1 - lam) * onehot(b), from z[a] and z[b]. A hard
// target (lam = 1) gives z[a] itself, also where z[a] is infinite (0 * inf would be NaN).
template <typename acc_t>
AFD_HD acc_t target_logit(acc_t z_a, acc_t z_b, acc_t lam) {
  return lam == acc_t(1) ? z_a : lam * z_a + (acc_t(1) - lam) * z_b;
}

// t[c], the target's probability of class c: lam at a, 1 - lam at b, their sum where a = b.
// (index_t: int on the GPU, where 64-bit class indices would cost registers.)
template <typename acc_t, typename index_t>
AFD_HD acc_t target_share(index_t c, index_t a, index_t b, acc_t lam) {
  return (c == a ? lam : acc_t(0)) + (c == b ? acc_t(1) - lam : acc_t(0));
}

// log q[c] from the row's max and log(sum exp((z - max) / T)).
template <typename acc_t>
AFD_HD acc_t log_prob_t(acc_t z, acc_t row_max, acc_t log_sum_t, acc_t inv_t) {
  return (z - row_max) * inv_t - log_sum_t;
}

// One class's term of KL(q_j || q_k).
template <typename acc_t>
AFD_HD acc_t kl_term(acc_t q_j, acc_t log_q_j, acc_t log_q_k) {
  return q_j * (log_q_j - log_q_k);
}

// Constants of a student row's gradient, fixed once per call (scaled by 1/B for the batch mean).
template <typename acc_t>
struct StudentGradScale {
  acc_t ce;            // ce_w / B, multiplies p_k
  acc_t ce_uniform;    // ce_w * eps / (C * B), subtracted everywhere
  acc_t ce_target;     // ce_w * (1 - eps) / B, times the target's share t[c], subtracted
  acc_t kd;            // kd_w * T / B, multiplies (S_k q_k - teacher mixture)
};

template <typename acc_t>
AFD_HD StudentGradScale<acc_t> student_grad_scale(acc_t ce_w, acc_t kd_w, acc_t t, acc_t eps,
                                                  int64_t num_classes, int64_t batch) {
  const acc_t inv_b = acc_t(1) / acc_t(batch);
  return {ce_w * inv_b, ce_w * eps * inv_b / acc_t(num_classes), ce_w * (acc_t(1) - eps) * inv_b,
          kd_w * t * inv_b};
}

// d loss_k / d z_k[c] for one class: p = softmax(z_k)[c], q = q_k[c],
// teacher_mix = sum_j W[k, j] q_j[c], weight_sum = S_k, share = t[c] (target_share).
template <typename acc_t>
AFD_HD acc_t student_grad(const StudentGradScale<acc_t>& s, acc_t p, acc_t q, acc_t teacher_mix,
                          acc_t weight_sum, acc_t share) {
  const acc_t g = s.ce * p - s.ce_uniform + s.kd * (weight_sum * q - teacher_mix);
  return share == acc_t(0) ? g : g - s.ce_target * share;
}

// LSGAN terms of one sample for discriminator D_k: own = D_k(own map) (fake), peer = D_k(peer's
// map) (real), both scores before the sigmoid.
template <typename acc_t>
struct LsganTerms {
  acc_t g;  // (real - s(own))^2: network k fools its own D
  acc_t d;  // (real - s(peer))^2 + (s(own) - fake)^2
};

template <typename acc_t>
AFD_HD LsganTerms<acc_t> lsgan_terms(acc_t own, acc_t peer, acc_t real, acc_t fake) {
  const acc_t so = sigmoid(own);
  const acc_t sp = sigmoid(peer);
  return {(real - so) * (real - so), (real - sp) * (real - sp) + (so - fake) * (so - fake)};
}

// Gradients of grad_g * g_loss + grad_d * d_loss (batch means) w.r.t. one sample's scores.
template <typename acc_t>
AFD_HD void lsgan_grads(acc_t own, acc_t peer, acc_t real, acc_t fake, acc_t grad_g, acc_t grad_d,
                        acc_t inv_b, acc_t* d_own, acc_t* d_peer) {
  const acc_t so = sigmoid(own);
  const acc_t sp = sigmoid(peer);
  const acc_t two = acc_t(2);
  *d_own = two * inv_b * so * (acc_t(1) - so) * (grad_g * (so - real) + grad_d * (so - fake));
  *d_peer = two * inv_b * sp * (acc_t(1) - sp) * grad_d * (sp - real);
}

}  // namespace afd
