// The emulator's own kernels (tests/test_cuda_emulated.py): a block sum that must give the right
// sums, and broken copies of it that the emulator must catch. Plain CUDA: it builds with nvcc too.
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

namespace {

constexpr int kThreads = 256;

enum Variant {
  kCorrect = 0,
  kMissingBarrier = 1,     // warp 0 reads the partial sums before the other warps wrote them
  kWrongStride = 2,        // grid-stride loop steps by one block: blocks add up each other's elements
  kOffByOne = 3,           // reads x[n]
  kDivergentBarrier = 4,   // half of the block calls __syncthreads()
  kPartialShuffle = 5,     // half of a warp calls a full-mask shuffle
  kReadBefore = 6,         // reads x[-1]
  kMisalignedLoad = 7,     // a 16-byte load from x + 1
  kSharedOutOfBounds = 8,  // writes one past the end of a __shared__ array
};

struct alignas(16) Pack4 {
  float v[4];
};

__device__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <int VARIANT>
__global__ void block_sum_kernel(const float* __restrict__ x, int64_t n, float* __restrict__ out) {
  __shared__ float partial[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t stride = VARIANT == kWrongStride ? int64_t(blockDim.x) : int64_t(blockDim.x) * gridDim.x;
  float v = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; VARIANT == kOffByOne ? i <= n : i < n; i += stride)
    v += VARIANT == kReadBefore ? x[i - 1] : x[i];
  if (VARIANT == kMisalignedLoad && threadIdx.x == 0 && n >= 5) {
    const Pack4 p = *reinterpret_cast<const Pack4*>(x + 1);
    v += p.v[0];
  }
  if (VARIANT == kPartialShuffle && lane < 16) v += __shfl_down_sync(0xffffffffu, v, 16);
  v = warp_sum(v);
  if (lane == 0) partial[VARIANT == kSharedOutOfBounds ? warp + 1 : warp] = v;
  if (VARIANT == kDivergentBarrier) {
    if (threadIdx.x < kThreads / 2) __syncthreads();
  } else if (VARIANT != kMissingBarrier) {
    __syncthreads();
  }
  if (warp == 0) {
    v = lane < kThreads / 32 ? partial[lane] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) out[blockIdx.x] = v;
  }
}

at::Tensor block_sum(const at::Tensor& x, int64_t variant, int64_t blocks) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float [n]");
  auto out = at::empty({blocks}, x.options());
  const auto grid = static_cast<unsigned int>(blocks);
  auto stream = at::cuda::getCurrentCUDAStream();
  const float* in = x.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  switch (variant) {
    case kCorrect: block_sum_kernel<kCorrect><<<grid, kThreads, 0, stream>>>(in, x.numel(), o); break;
    case kMissingBarrier: block_sum_kernel<kMissingBarrier><<<grid, kThreads, 0, stream>>>(in, x.numel(), o); break;
    case kWrongStride: block_sum_kernel<kWrongStride><<<grid, kThreads, 0, stream>>>(in, x.numel(), o); break;
    case kOffByOne: block_sum_kernel<kOffByOne><<<grid, kThreads, 0, stream>>>(in, x.numel(), o); break;
    case kDivergentBarrier: block_sum_kernel<kDivergentBarrier><<<grid, kThreads, 0, stream>>>(in, x.numel(), o); break;
    case kPartialShuffle: block_sum_kernel<kPartialShuffle><<<grid, kThreads, 0, stream>>>(in, x.numel(), o); break;
    case kReadBefore: block_sum_kernel<kReadBefore><<<grid, kThreads, 0, stream>>>(in, x.numel(), o); break;
    case kMisalignedLoad: block_sum_kernel<kMisalignedLoad><<<grid, kThreads, 0, stream>>>(in, x.numel(), o); break;
    case kSharedOutOfBounds:
      block_sum_kernel<kSharedOutOfBounds><<<grid, kThreads, 0, stream>>>(in, x.numel(), o);
      break;
    default: TORCH_CHECK(false, "unknown variant ", variant);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY(afd_emu_selftest, m) { m.def("block_sum(Tensor x, int variant, int blocks) -> Tensor", &block_sum); }
