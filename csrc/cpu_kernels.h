// CPU kernel of the mutual-distillation loss, compiled once per instruction set: ops_cpu.cpp
// includes it for the baseline x86-64/ARM target, ops_cpu_avx2.cpp under `#pragma GCC target`.
// AFD_CPU_ISA names the namespace, so the two copies never share a symbol.
//
// One sample at a time (a sample needs all M rows of its logits), samples spread over threads with
// at::parallel_for. Every loop over classes is a plain `omp simd` loop around the per-element
// math of afd_math.h, which the compiler vectorises.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <type_traits>
#include <vector>

#include "afd_math.h"

#ifndef AFD_CPU_ISA
#error "define AFD_CPU_ISA (the namespace of this copy of the kernels) before including cpu_kernels.h"
#endif

namespace afd {

#ifndef AFD_MUTUAL_DISTILLATION_ARGS
#define AFD_MUTUAL_DISTILLATION_ARGS
struct MutualDistillationArgs {
  int64_t rows, students, batch, classes;
  double temperature, ce_weight, kd_weight, label_smoothing;
};
#endif

namespace AFD_CPU_ISA {

// Per-row statistics of one sample and per-thread buffers: exp(z - max) of the students,
// exp((z - max) / T) of every row (both unnormalised), the teacher mixture of one student, and
// z converted to acc_t when the logits are half precision.
template <typename acc_t>
struct SampleScratch {
  std::vector<acc_t> z, e1, et, mix;
  std::vector<acc_t> row_max, inv_sum1, lse1, inv_sum_t, log_sum_t;
  std::vector<const acc_t*> rows;  // z of each row in acc_t: the logits themselves, or `z`
  SampleScratch(const MutualDistillationArgs& a, bool convert)
      : z(convert ? a.rows * a.classes : 0), e1(a.students * a.classes), et(a.rows * a.classes),
        mix(a.classes), row_max(a.rows), inv_sum1(a.rows), lse1(a.rows), inv_sum_t(a.rows),
        log_sum_t(a.rows), rows(a.rows) {}
};

template <typename scalar_t, typename acc_t>
void mutual_distillation_sample(const MutualDistillationArgs& a, const scalar_t* logits,
                                int64_t target_a, int64_t target_b, acc_t lam, const acc_t* weights, int64_t b,
                                SampleScratch<acc_t>& s, scalar_t* grad, acc_t* ce_out,
                                acc_t* kl_out) {
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t C = a.classes;
  const acc_t inv_t = acc_t(1) / acc_t(a.temperature);
  const acc_t eps = acc_t(a.label_smoothing);
  auto& rows = s.rows;
  for (int64_t m = 0; m < a.rows; ++m) {
    const scalar_t* src = logits + (m * a.batch + b) * C;
    acc_t mx = -INFINITY;
    if constexpr (kConvert) {
      acc_t* z = s.z.data() + m * C;
#pragma omp simd reduction(max : mx)
      for (int64_t c = 0; c < C; ++c) {
        z[c] = static_cast<acc_t>(src[c]);
        mx = z[c] > mx ? z[c] : mx;
      }
      rows[m] = z;
    } else {
#pragma omp simd reduction(max : mx)
      for (int64_t c = 0; c < C; ++c) mx = src[c] > mx ? src[c] : mx;
      rows[m] = src;
    }
    const acc_t* z = rows[m];
    acc_t* et = s.et.data() + m * C;
    acc_t sum_t = 0, sum1 = 0;
    if (m < a.students) {
      acc_t* e1 = s.e1.data() + m * C;
#pragma omp simd reduction(+ : sum_t, sum1)
      for (int64_t c = 0; c < C; ++c) {
        et[c] = exp_nonpos((z[c] - mx) * inv_t);
        e1[c] = exp_nonpos(z[c] - mx);
        sum_t += et[c];
        sum1 += e1[c];
      }
      s.inv_sum1[m] = acc_t(1) / sum1;
      s.lse1[m] = mx + std::log(sum1);
    } else {
#pragma omp simd reduction(+ : sum_t)
      for (int64_t c = 0; c < C; ++c) {
        et[c] = exp_nonpos((z[c] - mx) * inv_t);
        sum_t += et[c];
      }
    }
    s.row_max[m] = mx;
    s.inv_sum_t[m] = acc_t(1) / sum_t;
    s.log_sum_t[m] = std::log(sum_t);
  }

  const auto scale = student_grad_scale<acc_t>(acc_t(a.ce_weight), acc_t(a.kd_weight),
                                               acc_t(a.temperature), eps, C, a.batch);
  acc_t* mix = s.mix.data();
  for (int64_t k = 0; k < a.students; ++k) {
    const acc_t* zk = rows[k];
    acc_t mean_z = 0;
    if (eps != acc_t(0)) {
#pragma omp simd reduction(+ : mean_z)
      for (int64_t c = 0; c < C; ++c) mean_z += zk[c];
      mean_z /= acc_t(C);
    }
    ce_out[k * a.batch + b] = cross_entropy(s.lse1[k], target_logit(zk[target_a], zk[target_b], lam), mean_z, eps);

    // KL towards every teacher j, and the teacher mixture sum_j W[k, j] q_j for the gradient.
    acc_t kl = 0, weight_sum = 0;
    bool mix_started = false;
    const acc_t mk = s.row_max[k], lk = s.log_sum_t[k];
    for (int64_t j = 0; j < a.rows; ++j) {
      const acc_t w = weights[k * a.rows + j];
      if (w == acc_t(0)) continue;
      weight_sum += w;
      const acc_t* zj = rows[j];
      const acc_t* etj = s.et.data() + j * C;
      const acc_t mj = s.row_max[j], lj = s.log_sum_t[j], inv_j = s.inv_sum_t[j];
      const acc_t w_inv_j = w * inv_j;
      acc_t kl_j = 0;
      if (mix_started) {
#pragma omp simd reduction(+ : kl_j)
        for (int64_t c = 0; c < C; ++c) {
          kl_j += kl_term(etj[c] * inv_j, log_prob_t(zj[c], mj, lj, inv_t), log_prob_t(zk[c], mk, lk, inv_t));
          mix[c] += w_inv_j * etj[c];
        }
      } else {
#pragma omp simd reduction(+ : kl_j)
        for (int64_t c = 0; c < C; ++c) {
          kl_j += kl_term(etj[c] * inv_j, log_prob_t(zj[c], mj, lj, inv_t), log_prob_t(zk[c], mk, lk, inv_t));
          mix[c] = w_inv_j * etj[c];
        }
        mix_started = true;
      }
      kl += w * kl_j;
    }
    kl_out[k * a.batch + b] = kl;
    if (grad == nullptr) continue;
    if (!mix_started) std::fill(mix, mix + C, acc_t(0));
    const acc_t* e1k = s.e1.data() + k * C;
    const acc_t* etk = s.et.data() + k * C;
    const acc_t inv1 = s.inv_sum1[k], invt = s.inv_sum_t[k];
    scalar_t* dst = grad + (k * a.batch + b) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      dst[c] = static_cast<scalar_t>(
          student_grad(scale, e1k[c] * inv1, etk[c] * invt, mix[c], weight_sum,
                       target_share(c, target_a, target_b, lam)));
    }
  }
}

// Writes the per-sample CE and weighted KL sums ([K, B], acc dtype) and, when `grad` is defined,
// d loss_k / d z_k ([K, B, C], logits dtype). Inputs are contiguous and checked by the caller;
// target_b (int64) and lam (acc dtype) are defined for soft targets only.
void mutual_distillation_kernel(const MutualDistillationArgs& a, const at::Tensor& logits,
                                       const at::Tensor& target, const at::Tensor& target_b,
                                       const at::Tensor& lam, const at::Tensor& weights,
                                       const at::Tensor& grad, const at::Tensor& ce_per_sample,
                                       const at::Tensor& kl_per_sample) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "mutual_distillation_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t* y = target.const_data_ptr<int64_t>();
    const int64_t* y_b = target_b.defined() ? target_b.const_data_ptr<int64_t>() : y;
    const acc_t* mix_weight = lam.defined() ? lam.const_data_ptr<acc_t>() : nullptr;
    const acc_t* w = weights.const_data_ptr<acc_t>();
    scalar_t* g = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* ce = ce_per_sample.mutable_data_ptr<acc_t>();
    acc_t* kl = kl_per_sample.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / (a.rows * a.classes));
    at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) {
      SampleScratch<acc_t> scratch(a, !std::is_same_v<scalar_t, acc_t>);
      for (int64_t b = begin; b < end; ++b) {
        mutual_distillation_sample<scalar_t, acc_t>(a, z, y[b], y_b[b], mix_weight ? mix_weight[b] : acc_t(1), w, b,
                                                    scratch, g, ce, kl);
      }
    });
  });
}

}  // namespace AFD_CPU_ISA
}  // namespace afd
