// Host-side input validation shared by the CPU and CUDA implementations: every bad input gets a
// message that names the argument, what was expected and what was given.
#pragma once

#include <torch/types.h>

#include <optional>

namespace afd {

// Largest number of logit rows (students + teacher-only rows) one call accepts; the CUDA kernel
// keeps per-row statistics on chip.
constexpr int64_t kMaxRows = 8;

inline void check_logits_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_mutual_distillation_inputs(const at::Tensor& logits, const at::Tensor& target,
                                             const at::Tensor& peer_weights, double temperature,
                                             double label_smoothing) {
  TORCH_CHECK(logits.dim() == 3, "logits must be [M, B, C] (rows = networks, then teacher-only "
              "rows; batch; classes), got shape ", logits.sizes());
  check_logits_dtype(logits, "logits");
  const int64_t rows = logits.size(0), batch = logits.size(1), classes = logits.size(2);
  TORCH_CHECK(rows >= 1 && batch >= 1 && classes >= 1,
              "logits must have at least one row, sample and class, got shape ", logits.sizes());
  TORCH_CHECK(rows <= kMaxRows, "logits has ", rows, " rows; at most ", kMaxRows, " are supported");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == batch, "target must be [B] = [", batch,
              "] class indices, got shape ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "target must hold int64 (or int32) class indices, got ", target.scalar_type());
  TORCH_CHECK(peer_weights.dim() == 2 && peer_weights.size(0) >= 1 && peer_weights.size(0) <= rows &&
                  peer_weights.size(1) == rows,
              "peer_weights must be [K, M] with 1 <= K <= M = ", rows,
              " (one row per student network, one column per logit row), got shape ",
              peer_weights.sizes());
  TORCH_CHECK(at::isFloatingType(peer_weights.scalar_type()),
              "peer_weights must be a floating-point tensor, got ", peer_weights.scalar_type());
  TORCH_CHECK(target.device() == logits.device() && peer_weights.device() == logits.device(),
              "logits, target and peer_weights must be on one device, got ", logits.device(), ", ",
              target.device(), " and ", peer_weights.device());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "label_smoothing must be in [0, 1], got ", label_smoothing);
}

// Soft targets (mixup/CutMix): both or neither; target_b [B] class indices like target, lam [B]
// floating-point weights of target, on the logits' device.
inline void check_soft_target_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& target_b,
                                     const std::optional<at::Tensor>& lam) {
  TORCH_CHECK(target_b.has_value() == lam.has_value(),
              "soft targets need both target_b and lam (or neither), got ",
              target_b.has_value() ? "target_b without lam" : "lam without target_b");
  if (!target_b.has_value()) return;
  const int64_t batch = logits.size(1);
  TORCH_CHECK(target_b->dim() == 1 && target_b->size(0) == batch, "target_b must be [B] = [", batch,
              "] class indices, got shape ", target_b->sizes());
  TORCH_CHECK(target_b->scalar_type() == at::kLong || target_b->scalar_type() == at::kInt,
              "target_b must hold int64 (or int32) class indices, got ", target_b->scalar_type());
  TORCH_CHECK(lam->dim() == 1 && lam->size(0) == batch, "lam must be [B] = [", batch,
              "] weights of target (1 - lam goes to target_b), got shape ", lam->sizes());
  TORCH_CHECK(at::isFloatingType(lam->scalar_type()), "lam must be a floating-point tensor, got ",
              lam->scalar_type());
  TORCH_CHECK(target_b->device() == logits.device() && lam->device() == logits.device(),
              "target_b and lam must be on the logits' device ", logits.device(), ", got ",
              target_b->device(), " and ", lam->device());
}

inline void check_mutual_distillation_backward_inputs(const at::Tensor& grad_loss,
                                                      const at::Tensor& saved_grad,
                                                      int64_t num_rows) {
  TORCH_CHECK(saved_grad.dim() == 3 && saved_grad.numel() > 0,
              "mutual_distillation_backward needs the gradient saved by the forward (called with "
              "compute_grad=True), got shape ", saved_grad.sizes());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == saved_grad.size(0),
              "grad_loss must be [K] = [", saved_grad.size(0), "], got shape ", grad_loss.sizes());
  TORCH_CHECK(num_rows >= saved_grad.size(0), "num_rows (", num_rows,
              ") must be >= the number of students (", saved_grad.size(0), ")");
  TORCH_CHECK(grad_loss.device() == saved_grad.device(),
              "grad_loss and saved_grad must be on one device");
}

inline void check_lsgan_inputs(const at::Tensor& d_own, const at::Tensor& d_peer, double real_label,
                               double fake_label) {
  TORCH_CHECK(d_own.dim() == 2, "d_own must be [K, B] discriminator scores (one per network and "
              "sample, before the sigmoid), got shape ", d_own.sizes(),
              d_own.dim() == 3 && d_own.size(2) == 1 ? "; squeeze the last dimension" : "");
  TORCH_CHECK(d_peer.sizes() == d_own.sizes(), "d_peer must have the shape of d_own ",
              d_own.sizes(), ", got ", d_peer.sizes());
  TORCH_CHECK(d_own.size(0) >= 1 && d_own.size(1) >= 1,
              "d_own must have at least one network and one sample, got shape ", d_own.sizes());
  check_logits_dtype(d_own, "d_own");
  TORCH_CHECK(d_peer.scalar_type() == d_own.scalar_type(), "d_own and d_peer must have one dtype, got ",
              d_own.scalar_type(), " and ", d_peer.scalar_type());
  TORCH_CHECK(d_own.device() == d_peer.device(), "d_own and d_peer must be on one device, got ",
              d_own.device(), " and ", d_peer.device());
  TORCH_CHECK(std::isfinite(real_label) && std::isfinite(fake_label),
              "real_label and fake_label must be finite, got ", real_label, " and ", fake_label);
}

}  // namespace afd

namespace afd {

inline void check_lsgan_backward_inputs(const at::Tensor& grad_g, const at::Tensor& grad_d,
                                        const at::Tensor& d_own) {
  const int64_t k = d_own.size(0);
  TORCH_CHECK(grad_g.dim() == 1 && grad_g.size(0) == k && grad_d.dim() == 1 && grad_d.size(0) == k,
              "grad_g and grad_d must be [K] = [", k, "], got ", grad_g.sizes(), " and ",
              grad_d.sizes());
  TORCH_CHECK(grad_g.device() == d_own.device() && grad_d.device() == d_own.device(),
              "grad_g, grad_d and the scores must be on one device");
}

// Accumulation type of the kernels: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace afd
