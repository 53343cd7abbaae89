// CPU emulation of the CUDA execution model, enough to run afd_fast's kernels from their unmodified
// source (csrc/cuda/ops_cuda.cu) as host C++. Included before the kernel source; launches
// `k<<<cfg>>>(args)` are rewritten to `k ^ ::afd_emu::Config(cfg)(args)` by rewrite_launches() in
// __init__.py (the only change to the source text).
//
// Every emulated thread of a block is a fiber with its own stack. One OS thread runs them one at a
// time, in an order shuffled by a seeded generator, each until it reaches a synchronisation point:
// __syncthreads() (a block barrier), a warp operation (__shfl_*_sync, __syncwarp: lock-step over the
// lanes of the mask) or a scheduling point (__threadfence, atomics, __ldcg). A barrier or warp
// operation that not every thread (lane) reaches is reported with its source line instead of
// hanging. Blocks run one after another, in shuffled order; __shared__ variables live in one linker
// section that is filled with 0xFF (NaN for floats) before every block, so a read before a write
// shows. Faults (out-of-bounds reads and writes into the guard pages of runtime.cpp's allocator, a
// misaligned vector load, a fiber stack overflow) become a C++ exception naming the buffer, the
// offset, the emulated thread and the source line.
#pragma once

#include <math.h>  // the float overloads of ::log, ::exp, ... in the global namespace, as in CUDA

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One section for all shared memory: runtime.cpp poisons it before each block (see above).
#define __shared__ static __attribute__((section("afd_emu_shared"), aligned(16)))

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct afd_emu_stream;
typedef afd_emu_stream* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
struct cudaDeviceProp {
  int multiProcessorCount;
  int warpSize;
  int maxThreadsPerBlock;
  size_t sharedMemPerBlock;
};
constexpr int warpSize = 32;

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);

namespace afd_emu {

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
const cudaDeviceProp& device_properties();

// A point where the scheduler may run other threads before this one goes on.
void scheduling_point();
void block_barrier(const char* file, int line);

enum class WarpOp { Sync, ShflIdx, ShflUp, ShflDown, ShflXor };
const char* warp_op_name(WarpOp op);
// Lock-step warp operation: waits until every lane of `mask` has called the same operation at the
// same place, then each lane gets its source lane's `in` bytes in `out`.
void warp_exchange(WarpOp op, unsigned mask, const void* in, void* out, size_t size, int arg, int width,
                   const char* file, int line);

template <typename T>
T shuffle(WarpOp op, unsigned mask, T value, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shuffle of a type CUDA can't shuffle");
  T out;
  warp_exchange(op, mask, &value, &out, sizeof(T), arg, width, file, line);
  return out;
}

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  const char* file;
  int line;
  const char* caller;
};

// Runs `thread_body` once per emulated thread of every block (see the top of this file).
void launch(const LaunchConfig& config, const std::function<void()>& thread_body);

template <typename... Args>
struct PendingLaunch {
  LaunchConfig config;
  std::tuple<Args...> args;
};

// `<<<grid, block, shared, stream>>>`; the built-ins record the launch's place for messages.
struct Config {
  LaunchConfig config;
  Config(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr, const char* file = __builtin_FILE(),
         int line = __builtin_LINE(), const char* caller = __builtin_FUNCTION())
      : config{grid, block, shared_bytes, file, line, caller} {}
  template <typename... Args>
  PendingLaunch<std::decay_t<Args>...> operator()(Args&&... args) const {
    return {config, std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...)};
  }
};

// `kernel ^ Config(...)(args...)`: the arguments convert to the kernel's parameter types once, as
// a CUDA launch copies them; each emulated thread gets its own copy of the by-value parameters.
template <typename... Params, typename... Args>
void operator^(void (*kernel)(Params...), PendingLaunch<Args...>&& pending) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  const std::tuple<std::decay_t<Params>...> params(std::move(pending.args));
  launch(pending.config, [&] { std::apply(kernel, params); });
}

}  // namespace afd_emu

#define threadIdx (::afd_emu::thread_idx())
#define blockIdx (::afd_emu::block_idx())
#define blockDim (::afd_emu::block_dim())
#define gridDim (::afd_emu::grid_dim())

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::afd_emu::block_barrier(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  int dummy = 0;
  ::afd_emu::warp_exchange(::afd_emu::WarpOp::Sync, mask, &dummy, &dummy, sizeof(dummy), 0, warpSize, file, line);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return ::afd_emu::shuffle(::afd_emu::WarpOp::ShflIdx, mask, v, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return ::afd_emu::shuffle(::afd_emu::WarpOp::ShflUp, mask, v, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return ::afd_emu::shuffle(::afd_emu::WarpOp::ShflDown, mask, v, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return ::afd_emu::shuffle(::afd_emu::WarpOp::ShflXor, mask, v, lane_mask, width, file, line);
}

// Memory ordering between threads cannot go wrong here (one thread runs at a time), so the fence
// only lets the scheduler interleave; the GPU's ordering itself is what no CPU can show.
inline void __threadfence() { ::afd_emu::scheduling_point(); }
template <typename T>
T __ldcg(const T* ptr) {
  ::afd_emu::scheduling_point();
  return *ptr;
}
// Read-modify-write without a switch in between: atomic, since fibers never run in parallel.
template <typename T>
T atomicAdd(T* address, T value) {
  ::afd_emu::scheduling_point();
  const T old = *address;
  *address = old + value;
  return old;
}
