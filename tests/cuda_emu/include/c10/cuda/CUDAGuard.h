// Stand-in for c10's CUDA device guard under the CPU emulation: there is one (emulated) device.
#pragma once

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};

}  // namespace cuda
}  // namespace c10
