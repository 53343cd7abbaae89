// Stand-in for ATen's CUDA context under the CPU emulation (cuda_emu.h): the current stream is a
// null handle (launches run at once), the device properties are the emulator's.
#pragma once

#include <c10/util/Exception.h>

#include "cuda_emu.h"

namespace at {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(int device_index = -1) {
  (void)device_index;
  return {};
}

inline const cudaDeviceProp* getCurrentDeviceProperties() { return &::afd_emu::device_properties(); }

}  // namespace cuda
}  // namespace at

#define C10_CUDA_CHECK(EXPR)                                                                  \
  do {                                                                                        \
    const cudaError_t afd_emu_error = (EXPR);                                                 \
    TORCH_CHECK(afd_emu_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(afd_emu_error)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
