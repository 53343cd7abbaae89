// CPU implementations of the afd_fast operators: input checks, the choice of kernel copy
// (cpu_kernels.h, baseline or AVX2), batch means, and the small LSGAN and backward kernels.
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#define AFD_CPU_ISA baseline
#include "cpu_kernels.h"

namespace afd {

#if defined(__x86_64__) && defined(__GNUC__)
namespace avx2 {  // ops_cpu_avx2.cpp
void mutual_distillation_kernel(const MutualDistillationArgs& a, const at::Tensor& logits,
                                const at::Tensor& target, const at::Tensor& target_b,
                                const at::Tensor& lam, const at::Tensor& weights,
                                const at::Tensor& grad, const at::Tensor& ce_per_sample,
                                const at::Tensor& kl_per_sample);
}
#endif

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// Plain loops instead of ATen reductions: this op is called every step and its fixed cost counts.
void check_class_indices(const at::Tensor& indices, int64_t classes, const char* name) {
  const int64_t* y = indices.const_data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(y, y + indices.numel());
  TORCH_CHECK(*lo >= 0 && *hi < classes, name, " holds class indices in [", *lo, ", ", *hi,
              "], but logits have ", classes, " classes (valid: 0..", classes - 1, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mutual_distillation_forward_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& weights_in,
    double temperature, double ce_weight, double kd_weight, double label_smoothing,
    bool compute_grad, const std::optional<at::Tensor>& target_b_in, const std::optional<at::Tensor>& lam_in) {
  check_mutual_distillation_inputs(logits_in, target_in, weights_in, temperature, label_smoothing);
  check_soft_target_inputs(logits_in, target_b_in, lam_in);
  TORCH_CHECK(logits_in.device().is_cpu(), "mutual_distillation_forward_cpu got a ",
              logits_in.device(), " tensor");
  const auto logits = logits_in.contiguous();
  const auto target = target_in.to(at::kLong).contiguous();
  const int64_t classes = logits.size(2);
  check_class_indices(target, classes, "target");
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor target_b, lam;  // undefined: hard targets
  if (target_b_in.has_value()) {
    target_b = target_b_in->to(at::kLong).contiguous();
    check_class_indices(target_b, classes, "target_b");
    lam = lam_in->to(acc).contiguous();
  }
  const auto weights = weights_in.to(acc).contiguous();
  MutualDistillationArgs a{logits.size(0), weights.size(0), logits.size(1), classes,
                           temperature, ce_weight, kd_weight, label_smoothing};
  const auto opts = logits.options().dtype(acc);
  auto per_sample = at::empty({2, a.students, a.batch}, opts);  // CE and weighted KL of each sample
  auto grad = compute_grad ? at::empty({a.students, a.batch, classes}, logits.options())
                           : at::empty({0}, logits.options());

  const at::Tensor grad_or_undefined = compute_grad ? grad : at::Tensor();
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2()) {
    avx2::mutual_distillation_kernel(a, logits, target, target_b, lam, weights, grad_or_undefined, per_sample[0],
                                     per_sample[1]);
  } else
#endif
  {
    baseline::mutual_distillation_kernel(a, logits, target, target_b, lam, weights, grad_or_undefined, per_sample[0],
                                         per_sample[1]);
  }
  // Batch means in a fixed order (double sums), so results do not depend on the thread count.
  auto loss = at::empty({a.students}, opts), ce = at::empty({a.students}, opts), kl = at::empty({a.students}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "mutual_distillation_batch_means", [&] {
    const scalar_t* ps = per_sample.const_data_ptr<scalar_t>();
    const int64_t K = a.students, B = a.batch;
    for (int64_t k = 0; k < K; ++k) {
      double ce_sum = 0, kl_sum = 0;
      for (int64_t b = 0; b < B; ++b) {
        ce_sum += ps[k * B + b];
        kl_sum += ps[(K + k) * B + b];
      }
      const auto ce_k = static_cast<scalar_t>(ce_weight * ce_sum / B);
      const auto kl_k = static_cast<scalar_t>(kd_weight * temperature * temperature * kl_sum / B);
      ce.mutable_data_ptr<scalar_t>()[k] = ce_k;
      kl.mutable_data_ptr<scalar_t>()[k] = kl_k;
      loss.mutable_data_ptr<scalar_t>()[k] = ce_k + kl_k;
    }
  });
  return {loss, ce, kl, grad};
}

template <typename scalar_t, typename acc_t>
void scale_row(const scalar_t* src, acc_t scale, scalar_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<scalar_t>(scale * static_cast<acc_t>(src[e]));
}

at::Tensor mutual_distillation_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& saved_grad,
                                            int64_t num_rows) {
  check_mutual_distillation_backward_inputs(grad_loss, saved_grad, num_rows);
  const int64_t students = saved_grad.size(0);
  const auto saved = saved_grad.contiguous();
  const auto scale = grad_loss.to(acc_dtype(saved.scalar_type())).contiguous();
  auto out = at::empty({num_rows, saved.size(1), saved.size(2)}, saved.options());
  const int64_t row = saved.size(1) * saved.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "mutual_distillation_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = saved.const_data_ptr<scalar_t>();
    const acc_t* g = scale.const_data_ptr<acc_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // Chunks of one row's elements, so the row (and its scale) is fixed inside each inner loop.
    constexpr int64_t kChunk = 4096;
    const int64_t chunks_per_row = (row + kChunk - 1) / kChunk;
    at::parallel_for(0, num_rows * chunks_per_row, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t m = i / chunks_per_row, lo = m * row + (i % chunks_per_row) * kChunk;
        const int64_t hi = std::min(lo + kChunk, (m + 1) * row);
        // A zero grad_loss[m] gives exact zeros, also where a non-finite loss left NaN in saved[m].
        if (m >= students || g[m] == acc_t(0)) {
          std::fill(dst + lo, dst + hi, scalar_t(0));
          continue;
        }
        scale_row(src + lo, g[m], dst + lo, hi - lo);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> lsgan_forward_cpu(const at::Tensor& d_own_in, const at::Tensor& d_peer_in,
                                                     double real_label, double fake_label) {
  check_lsgan_inputs(d_own_in, d_peer_in, real_label, fake_label);
  const auto own = d_own_in.contiguous(), peer = d_peer_in.contiguous();
  const int64_t K = own.size(0), B = own.size(1);
  const auto acc = acc_dtype(own.scalar_type());
  auto g_loss = at::empty({K}, own.options().dtype(acc));
  auto d_loss = at::empty({K}, own.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, own.scalar_type(), "lsgan_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* o = own.data_ptr<scalar_t>();
    const scalar_t* p = peer.data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) {
      acc_t g = 0, d = 0;
      for (int64_t b = 0; b < B; ++b) {
        const auto t = lsgan_terms<acc_t>(o[k * B + b], p[k * B + b], acc_t(real_label), acc_t(fake_label));
        g += t.g;
        d += t.d;
      }
      g_loss.data_ptr<acc_t>()[k] = g / acc_t(B);
      d_loss.data_ptr<acc_t>()[k] = d / acc_t(B);
    }
  });
  return {g_loss, d_loss};
}

std::tuple<at::Tensor, at::Tensor> lsgan_backward_cpu(const at::Tensor& grad_g_in, const at::Tensor& grad_d_in,
                                                      const at::Tensor& d_own_in, const at::Tensor& d_peer_in,
                                                      double real_label, double fake_label) {
  check_lsgan_inputs(d_own_in, d_peer_in, real_label, fake_label);
  check_lsgan_backward_inputs(grad_g_in, grad_d_in, d_own_in);
  const auto own = d_own_in.contiguous(), peer = d_peer_in.contiguous();
  const auto acc = acc_dtype(own.scalar_type());
  const auto grad_g = grad_g_in.to(acc).contiguous(), grad_d = grad_d_in.to(acc).contiguous();
  const int64_t K = own.size(0), B = own.size(1);
  auto grad_own = at::empty_like(own), grad_peer = at::empty_like(peer);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, own.scalar_type(), "lsgan_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* o = own.data_ptr<scalar_t>();
    const scalar_t* p = peer.data_ptr<scalar_t>();
    const acc_t* gg = grad_g.data_ptr<acc_t>();
    const acc_t* gd = grad_d.data_ptr<acc_t>();
    scalar_t* go = grad_own.data_ptr<scalar_t>();
    scalar_t* gp = grad_peer.data_ptr<scalar_t>();
    for (int64_t i = 0; i < K * B; ++i) {
      acc_t d_o, d_p;
      lsgan_grads<acc_t>(o[i], p[i], acc_t(real_label), acc_t(fake_label), gg[i / B], gd[i / B],
                         acc_t(1) / acc_t(B), &d_o, &d_p);
      go[i] = static_cast<scalar_t>(d_o);
      gp[i] = static_cast<scalar_t>(d_p);
    }
  });
  return {grad_own, grad_peer};
}

}  // namespace

TORCH_LIBRARY_IMPL(afd_fast, CPU, m) {
  m.impl("mutual_distillation_forward", &mutual_distillation_forward_cpu);
  m.impl("mutual_distillation_backward", &mutual_distillation_backward_cpu);
  m.impl("lsgan_forward", &lsgan_forward_cpu);
  m.impl("lsgan_backward", &lsgan_backward_cpu);
}

}  // namespace afd
