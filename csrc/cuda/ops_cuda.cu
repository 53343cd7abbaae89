// CUDA kernels of the afd_fast operators. All launches go on the current stream, nothing syncs
// with the host and nothing is allocated but the outputs and a small workspace from PyTorch's
// caching allocator, so the ops can be captured in CUDA graphs.
//
// mutual_distillation_forward: one group of threads per sample (a warp when C <= 4096, else a
// block of 256 threads), reading all M rows of that sample. Pass 1 reads the rows once with
// 16-byte loads and keeps online row statistics (afd_math.h); pass 2 reads them again (from L2 for
// rows that fit there) and writes the losses' per-sample parts and the student gradients. The last
// block to finish reduces the per-sample parts to the batch means in a fixed order, so the result
// is deterministic and the whole op is one kernel launch (plus a 4-byte memset).
//
// Also compiled for the CPU by the test suite: tests/cuda_emu rewrites the kernel launches of
// this file and serves its CUDA built-ins and the ATen/c10 CUDA headers it includes (cuda_emu.h,
// tests/cuda_emu/include/), so that tests/test_cuda_emulated.py runs these kernels unmodified.
// A kernel edit must keep compiling there too: a new built-in or CUDA header needs its stand-in
// (docs/design.md §5).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "afd_math.h"
#include "checks.h"

namespace afd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWarpPerSampleMaxClasses = 4096;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return __shfl_sync(0xffffffffu, v, 0);
}

// Sum over a group of `group` threads (32: this warp; kThreads: the block). Every thread of the
// group gets the same value; the order of additions is fixed. Block groups use `smem` [kWarps].
template <typename T>
__device__ __forceinline__ T group_sum(T v, int group, T* smem) {
  v = warp_sum(v);
  if (group == 32) return v;
  __syncthreads();  // a previous call may still be reading smem
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  T total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += smem[w];
  return total;
}

template <typename acc_t>
__device__ __forceinline__ OnlineRowStats<acc_t> shfl_down_stats(const OnlineRowStats<acc_t>& s, int offset) {
  return {__shfl_down_sync(0xffffffffu, s.max, offset), __shfl_down_sync(0xffffffffu, s.sum1, offset),
          __shfl_down_sync(0xffffffffu, s.sum_t, offset), __shfl_down_sync(0xffffffffu, s.sum_z, offset)};
}

template <typename acc_t>
__device__ __forceinline__ OnlineRowStats<acc_t> shfl_stats(const OnlineRowStats<acc_t>& s, int lane) {
  return {__shfl_sync(0xffffffffu, s.max, lane), __shfl_sync(0xffffffffu, s.sum1, lane),
          __shfl_sync(0xffffffffu, s.sum_t, lane), __shfl_sync(0xffffffffu, s.sum_z, lane)};
}

// Merge of row statistics over the group, same contract as group_sum.
template <typename acc_t>
__device__ __forceinline__ OnlineRowStats<acc_t> group_merge(OnlineRowStats<acc_t> s, acc_t inv_t, int group,
                                                             OnlineRowStats<acc_t>* smem) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s = online_row_stats_merge(s, shfl_down_stats(s, offset), inv_t);
  s = shfl_stats(s, 0);
  if (group == 32) return s;
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = s;
  __syncthreads();
  OnlineRowStats<acc_t> total = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = online_row_stats_merge(total, smem[w], inv_t);
  return total;
}

template <typename acc_t>
struct MdParams {
  int rows, students;
  int64_t batch, classes;
  int group;  // threads per sample: 32 or kThreads
  acc_t inv_t, eps, ce_weight, kd_t2;
  StudentGradScale<acc_t> scale;
};

template <typename scalar_t, typename acc_t, int VEC, int MAX_ROWS>
__global__ void __launch_bounds__(kThreads)
    mutual_distillation_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                                       const int64_t* __restrict__ target_b, const acc_t* __restrict__ lam,
                                       const acc_t* __restrict__ weights, const MdParams<acc_t> p,
                                       scalar_t* __restrict__ grad, acc_t* __restrict__ ce_ps,
                                       acc_t* __restrict__ kl_ps, unsigned int* __restrict__ counter,
                                       acc_t* __restrict__ loss_out, acc_t* __restrict__ ce_out,
                                       acc_t* __restrict__ kl_out) {
  using Vec = Pack<scalar_t, VEC>;
  __shared__ acc_t w_smem[MAX_ROWS * MAX_ROWS];
  __shared__ acc_t weight_sum[MAX_ROWS];  // per student: sum_j W[k, j] (shared: registers are scarce)
  __shared__ acc_t sum_smem[kWarps];
  __shared__ OnlineRowStats<acc_t> stats_smem[kWarps];
  __shared__ bool is_last_block;

  for (int i = threadIdx.x; i < p.students * p.rows; i += kThreads) w_smem[i] = weights[i];
  __syncthreads();
  if (threadIdx.x < p.students) {
    acc_t sum = 0;
    for (int j = 0; j < p.rows; ++j) sum += w_smem[threadIdx.x * p.rows + j];
    weight_sum[threadIdx.x] = sum;
  }
  __syncthreads();

  // With group == kThreads the grid has exactly B blocks, so the whole block shares b < B and the
  // barriers inside the group reductions below are reached by every thread.
  const int samples_per_block = kThreads / p.group;
  const int lane = threadIdx.x % p.group;
  const int64_t b = int64_t(blockIdx.x) * samples_per_block + threadIdx.x / p.group;
  const int64_t C = p.classes;

  if (b < p.batch) {
    // Row m of this sample starts at row0 + m * row_stride (no per-row pointers: registers).
    const scalar_t* row0 = logits + b * C;
    const int64_t row_stride = p.batch * C;

    // Pass 1: online statistics of every row.
    OnlineRowStats<acc_t> st[MAX_ROWS];
#pragma unroll
    for (int m = 0; m < MAX_ROWS; ++m) st[m] = online_row_stats_empty<acc_t>();
    for (int64_t c0 = int64_t(lane) * VEC; c0 < C; c0 += int64_t(p.group) * VEC) {
#pragma unroll
      for (int m = 0; m < MAX_ROWS; ++m) {
        if (m >= p.rows) break;
        const Vec z = *reinterpret_cast<const Vec*>(row0 + m * row_stride + c0);
#pragma unroll
        for (int v = 0; v < VEC; ++v) online_row_stats_add(st[m], static_cast<acc_t>(z.v[v]), p.inv_t);
      }
    }
    // The sample's target: a hard one (a = b = y, lam = 1) or a soft one (target_b, lam). A bad index
    // (no host check on CUDA) gives NaN: the CE through its target logit, the gradient through
    // inv_sum1 (a poisoned row constant costs no register in pass 2).
    const int64_t y64 = target[b], y_b64 = target_b != nullptr ? target_b[b] : y64;
    const bool valid = y64 >= 0 && y64 < C && y_b64 >= 0 && y_b64 < C;
    const int y = valid ? static_cast<int>(y64) : 0, y_b = valid ? static_cast<int>(y_b64) : 0;  // C < 2^31
    const acc_t lam_b = lam != nullptr ? lam[b] : acc_t(1);
    acc_t row_max[MAX_ROWS], inv_sum1[MAX_ROWS], inv_sum_t[MAX_ROWS], log_sum_t[MAX_ROWS];
#pragma unroll
    for (int m = 0; m < MAX_ROWS; ++m) {
      if (m >= p.rows) break;
      const OnlineRowStats<acc_t> s = group_merge(st[m], p.inv_t, p.group, stats_smem);
      row_max[m] = s.max;
      inv_sum1[m] = valid ? acc_t(1) / s.sum1 : acc_t(NAN);
      inv_sum_t[m] = acc_t(1) / s.sum_t;
      log_sum_t[m] = ::log(s.sum_t);
      if (m < p.students && lane == 0) {
        const acc_t z_t = valid ? target_logit(static_cast<acc_t>(row0[m * row_stride + y]),
                                               static_cast<acc_t>(row0[m * row_stride + y_b]), lam_b)
                                : acc_t(NAN);
        const acc_t mean_z = p.eps == acc_t(0) ? acc_t(0) : s.sum_z / acc_t(C);  // as on the CPU
        ce_ps[m * p.batch + b] = cross_entropy(s.max + ::log(s.sum1), z_t, mean_z, p.eps);
      }
    }

    // Pass 2: KL terms and student gradients, class by class.
    acc_t kl_acc[MAX_ROWS];
#pragma unroll
    for (int k = 0; k < MAX_ROWS; ++k) kl_acc[k] = 0;
    for (int64_t c0 = int64_t(lane) * VEC; c0 < C; c0 += int64_t(p.group) * VEC) {
      // The rows stay packed as loaded (16 bytes each, whatever the dtype) and are widened where
      // used: unpacked to acc_t, 8 rows of bfloat16 would take 64 registers instead of 32.
      Vec z[MAX_ROWS];
#pragma unroll
      for (int m = 0; m < MAX_ROWS; ++m) {
        if (m >= p.rows) break;
        z[m] = *reinterpret_cast<const Vec*>(row0 + m * row_stride + c0);
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc_t q[MAX_ROWS], log_q[MAX_ROWS];
#pragma unroll
        for (int m = 0; m < MAX_ROWS; ++m) {
          if (m >= p.rows) break;
          const acc_t z_mv = static_cast<acc_t>(z[m].v[v]);
          log_q[m] = log_prob_t(z_mv, row_max[m], log_sum_t[m], p.inv_t);
          q[m] = exp_nonpos((z_mv - row_max[m]) * p.inv_t) * inv_sum_t[m];
        }
#pragma unroll
        for (int k = 0; k < MAX_ROWS; ++k) {
          if (k >= p.students) break;
          acc_t mix = 0, kl = 0;
#pragma unroll
          for (int j = 0; j < MAX_ROWS; ++j) {
            if (j >= p.rows) break;
            const acc_t w = w_smem[k * p.rows + j];
            if (w == acc_t(0)) continue;  // as on the CPU: a non-finite row with weight 0 stays out
            mix += w * q[j];
            kl += w * kl_term(q[j], log_q[j], log_q[k]);
          }
          kl_acc[k] += kl;
          if (grad != nullptr) {
            const acc_t prob = exp_nonpos(static_cast<acc_t>(z[k].v[v]) - row_max[k]) * inv_sum1[k];
            // z[k].v[v] is not needed any more: it now holds the gradient until the store below.
            z[k].v[v] = static_cast<scalar_t>(
                student_grad(p.scale, prob, q[k], mix, weight_sum[k], target_share(static_cast<int>(c0) + v, y, y_b, lam_b)));
          }
        }
      }
      if (grad != nullptr) {
#pragma unroll
        for (int k = 0; k < MAX_ROWS; ++k) {
          if (k >= p.students) break;
          *reinterpret_cast<Vec*>(grad + (int64_t(k) * p.batch + b) * C + c0) = z[k];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < MAX_ROWS; ++k) {
      if (k >= p.students) break;
      const acc_t kl = group_sum(kl_acc[k], p.group, sum_smem);
      if (lane == 0) kl_ps[k * p.batch + b] = kl;
    }
  }

  // The last block to finish turns the per-sample parts into batch means.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last_block = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last_block) return;
  __threadfence();
  for (int k = 0; k < p.students; ++k) {
    acc_t ce = 0, kl = 0;
    for (int64_t i = threadIdx.x; i < p.batch; i += kThreads) {
      ce += __ldcg(ce_ps + k * p.batch + i);
      kl += __ldcg(kl_ps + k * p.batch + i);
    }
    ce = group_sum(ce, kThreads, sum_smem);
    kl = group_sum(kl, kThreads, sum_smem);
    if (threadIdx.x == 0) {
      ce_out[k] = p.ce_weight * ce / acc_t(p.batch);
      kl_out[k] = p.kd_t2 * kl / acc_t(p.batch);
      loss_out[k] = ce_out[k] + kl_out[k];
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC, int MAX_ROWS>
void launch_mutual_distillation(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& target_b,
                                const at::Tensor& lam, const at::Tensor& weights,
                                const MdParams<acc_t>& p, const at::Tensor& grad, const at::Tensor& work,
                                const at::Tensor& counter, const at::Tensor& loss, const at::Tensor& ce,
                                const at::Tensor& kl) {
  const int samples_per_block = kThreads / p.group;
  const int64_t num_blocks = (p.batch + samples_per_block - 1) / samples_per_block;
  TORCH_CHECK(num_blocks <= std::numeric_limits<int32_t>::max(), "batch of ", p.batch, " samples is too large");
  const auto blocks = static_cast<unsigned int>(num_blocks);
  auto stream = at::cuda::getCurrentCUDAStream();
  acc_t* ws = work.mutable_data_ptr<acc_t>();
  mutual_distillation_forward_kernel<scalar_t, acc_t, VEC, MAX_ROWS><<<blocks, kThreads, 0, stream>>>(
      logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
      target_b.defined() ? target_b.const_data_ptr<int64_t>() : nullptr, lam.defined() ? lam.const_data_ptr<acc_t>() : nullptr,
      weights.const_data_ptr<acc_t>(), p,
      grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr, ws, ws + p.students * p.batch,
      reinterpret_cast<unsigned int*>(counter.mutable_data_ptr<int32_t>()), loss.mutable_data_ptr<acc_t>(),
      ce.mutable_data_ptr<acc_t>(), kl.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_for_rows(int64_t rows, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& target_b,
                     const at::Tensor& lam, const at::Tensor& weights,
                     const MdParams<acc_t>& p, const at::Tensor& grad, const at::Tensor& work,
                     const at::Tensor& counter, const at::Tensor& loss, const at::Tensor& ce, const at::Tensor& kl) {
  // Register arrays sized for the rows: the common pair (M = 2) stays light on registers.
  if (rows <= 2) {
    launch_mutual_distillation<scalar_t, acc_t, VEC, 2>(logits, target, target_b, lam, weights, p, grad, work, counter, loss, ce, kl);
  } else if (rows <= 4) {
    launch_mutual_distillation<scalar_t, acc_t, VEC, 4>(logits, target, target_b, lam, weights, p, grad, work, counter, loss, ce, kl);
  } else {
    launch_mutual_distillation<scalar_t, acc_t, VEC, kMaxRows>(logits, target, target_b, lam, weights, p, grad, work, counter, loss,
                                                               ce, kl);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mutual_distillation_forward_cuda(
    const at::Tensor& logits_in, const at::Tensor& target_in, const at::Tensor& weights_in, double temperature,
    double ce_weight, double kd_weight, double label_smoothing, bool compute_grad,
    const std::optional<at::Tensor>& target_b_in, const std::optional<at::Tensor>& lam_in) {
  check_mutual_distillation_inputs(logits_in, target_in, weights_in, temperature, label_smoothing);
  check_soft_target_inputs(logits_in, target_b_in, lam_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto target = target_in.to(at::kLong).contiguous();
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor target_b, lam;  // undefined: hard targets
  if (target_b_in.has_value()) {
    target_b = target_b_in->to(at::kLong).contiguous();
    lam = lam_in->to(acc).contiguous();
  }
  const auto weights = weights_in.to(acc).contiguous();
  const int64_t rows = logits.size(0), batch = logits.size(1), classes = logits.size(2);
  TORCH_CHECK(classes <= std::numeric_limits<int32_t>::max(), "logits have ", classes,
              " classes; the CUDA kernel takes at most 2^31 - 1");
  const int64_t students = weights.size(0);
  auto opts = logits.options().dtype(acc);
  auto loss = at::empty({students}, opts), ce = at::empty({students}, opts), kl = at::empty({students}, opts);
  auto work = at::empty({2 * students * batch}, opts);
  auto counter = at::empty({1}, logits.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(counter.mutable_data_ptr<int32_t>(), 0, sizeof(int32_t),
                                 at::cuda::getCurrentCUDAStream()));
  auto grad = compute_grad ? at::empty({students, batch, classes}, logits.options()) : at::empty({0}, logits.options());
  const at::Tensor grad_or_undefined = compute_grad ? grad : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "mutual_distillation_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    MdParams<acc_t> p;
    p.rows = static_cast<int>(rows);
    p.students = static_cast<int>(students);
    p.batch = batch;
    p.classes = classes;
    p.group = classes <= kWarpPerSampleMaxClasses ? 32 : kThreads;
    p.inv_t = acc_t(1) / acc_t(temperature);
    p.eps = acc_t(label_smoothing);
    p.ce_weight = acc_t(ce_weight);
    p.kd_t2 = acc_t(kd_weight * temperature * temperature);
    p.scale = student_grad_scale<acc_t>(acc_t(ce_weight), acc_t(kd_weight), acc_t(temperature), p.eps, classes, batch);
    constexpr int kVec = 16 / sizeof(scalar_t);
    // 16-byte loads need every row start aligned: C a multiple of the pack and aligned buffers.
    const bool aligned = classes % kVec == 0 && reinterpret_cast<uintptr_t>(logits.const_data_ptr()) % 16 == 0 &&
                         (!compute_grad || reinterpret_cast<uintptr_t>(grad.const_data_ptr()) % 16 == 0);
    if (aligned) {
      launch_for_rows<scalar_t, acc_t, kVec>(rows, logits, target, target_b, lam, weights, p, grad_or_undefined, work, counter, loss,
                                             ce, kl);
    } else {
      launch_for_rows<scalar_t, acc_t, 1>(rows, logits, target, target_b, lam, weights, p, grad_or_undefined, work, counter, loss,
                                          ce, kl);
    }
  });
  return {loss, ce, kl, grad};
}

template <typename scalar_t, typename acc_t>
__global__ void scale_rows_kernel(const scalar_t* __restrict__ saved, const acc_t* __restrict__ scale,
                                  int64_t students, int64_t row, int64_t total, scalar_t* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / row;
    // A zero grad_loss[m] gives exact zeros, also where a non-finite loss left NaN in saved[m].
    const acc_t s = m < students ? scale[m] : acc_t(0);
    out[i] = s == acc_t(0) ? scalar_t(0) : static_cast<scalar_t>(s * static_cast<acc_t>(saved[i]));
  }
}

int grid_for(int64_t n) {
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks)));
}

at::Tensor mutual_distillation_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& saved_grad,
                                             int64_t num_rows) {
  check_mutual_distillation_backward_inputs(grad_loss, saved_grad, num_rows);
  const c10::cuda::CUDAGuard guard(saved_grad.device());
  const auto saved = saved_grad.contiguous();
  const auto scale = grad_loss.to(acc_dtype(saved.scalar_type())).contiguous();
  auto out = at::empty({num_rows, saved.size(1), saved.size(2)}, saved.options());
  const int64_t row = saved.size(1) * saved.size(2), total = num_rows * row;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "mutual_distillation_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scale_rows_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        saved.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(), saved.size(0), row, total,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// One block per discriminator k: sums over the batch in a fixed order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lsgan_forward_kernel(const scalar_t* __restrict__ own, const scalar_t* __restrict__ peer, int64_t batch,
                         acc_t real, acc_t fake, acc_t* __restrict__ g_loss, acc_t* __restrict__ d_loss) {
  __shared__ acc_t smem[kWarps];
  const int64_t k = blockIdx.x;
  acc_t g = 0, d = 0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    const auto t = lsgan_terms<acc_t>(static_cast<acc_t>(own[k * batch + b]), static_cast<acc_t>(peer[k * batch + b]),
                                      real, fake);
    g += t.g;
    d += t.d;
  }
  g = group_sum(g, kThreads, smem);
  d = group_sum(d, kThreads, smem);
  if (threadIdx.x == 0) {
    g_loss[k] = g / acc_t(batch);
    d_loss[k] = d / acc_t(batch);
  }
}

std::tuple<at::Tensor, at::Tensor> lsgan_forward_cuda(const at::Tensor& d_own_in, const at::Tensor& d_peer_in,
                                                      double real_label, double fake_label) {
  check_lsgan_inputs(d_own_in, d_peer_in, real_label, fake_label);
  const c10::cuda::CUDAGuard guard(d_own_in.device());
  const auto own = d_own_in.contiguous(), peer = d_peer_in.contiguous();
  const int64_t K = own.size(0), B = own.size(1);
  const auto opts = own.options().dtype(acc_dtype(own.scalar_type()));
  auto g_loss = at::empty({K}, opts), d_loss = at::empty({K}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, own.scalar_type(), "lsgan_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lsgan_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(K), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        own.const_data_ptr<scalar_t>(), peer.const_data_ptr<scalar_t>(), B, acc_t(real_label), acc_t(fake_label),
        g_loss.mutable_data_ptr<acc_t>(), d_loss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_loss, d_loss};
}

template <typename scalar_t, typename acc_t>
__global__ void lsgan_backward_kernel(const acc_t* __restrict__ grad_g, const acc_t* __restrict__ grad_d,
                                      const scalar_t* __restrict__ own, const scalar_t* __restrict__ peer,
                                      int64_t batch, int64_t total, acc_t real, acc_t fake,
                                      scalar_t* __restrict__ grad_own, scalar_t* __restrict__ grad_peer) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t d_o, d_p;
    lsgan_grads<acc_t>(static_cast<acc_t>(own[i]), static_cast<acc_t>(peer[i]), real, fake, grad_g[i / batch],
                       grad_d[i / batch], acc_t(1) / acc_t(batch), &d_o, &d_p);
    grad_own[i] = static_cast<scalar_t>(d_o);
    grad_peer[i] = static_cast<scalar_t>(d_p);
  }
}

std::tuple<at::Tensor, at::Tensor> lsgan_backward_cuda(const at::Tensor& grad_g_in, const at::Tensor& grad_d_in,
                                                       const at::Tensor& d_own_in, const at::Tensor& d_peer_in,
                                                       double real_label, double fake_label) {
  check_lsgan_inputs(d_own_in, d_peer_in, real_label, fake_label);
  check_lsgan_backward_inputs(grad_g_in, grad_d_in, d_own_in);
  const c10::cuda::CUDAGuard guard(d_own_in.device());
  const auto own = d_own_in.contiguous(), peer = d_peer_in.contiguous();
  const auto acc = acc_dtype(own.scalar_type());
  const auto grad_g = grad_g_in.to(acc).contiguous(), grad_d = grad_d_in.to(acc).contiguous();
  auto grad_own = at::empty_like(own), grad_peer = at::empty_like(peer);
  const int64_t total = own.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, own.scalar_type(), "lsgan_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lsgan_backward_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_g.const_data_ptr<acc_t>(), grad_d.const_data_ptr<acc_t>(), own.const_data_ptr<scalar_t>(),
        peer.const_data_ptr<scalar_t>(), own.size(1), total, acc_t(real_label), acc_t(fake_label),
        grad_own.mutable_data_ptr<scalar_t>(), grad_peer.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_own, grad_peer};
}

}  // namespace

TORCH_LIBRARY_IMPL(afd_fast, CUDA, m) {
  m.impl("mutual_distillation_forward", &mutual_distillation_forward_cuda);
  m.impl("mutual_distillation_backward", &mutual_distillation_backward_cuda);
  m.impl("lsgan_forward", &lsgan_forward_cuda);
  m.impl("lsgan_backward", &lsgan_backward_cuda);
}

}  // namespace afd
