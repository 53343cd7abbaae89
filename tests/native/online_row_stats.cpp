// Test-only operator afd_fast_test::online_row_stats: the CUDA kernel's single-pass row statistics
// (csrc/afd_math.h) run on the CPU. Each row of z [N, C] is split over `lanes` interleaved partial
// states, merged as a warp's shfl_down tree merges them. Returns [N, 4]: max, logsumexp(z),
// log sum exp((z - max) / T), sum z. Built by tests/_native.py; not part of afd_fast.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "afd_math.h"

namespace {

at::Tensor online_row_stats(const at::Tensor& z_in, double temperature, int64_t lanes) {
  TORCH_CHECK(z_in.dim() == 2 && z_in.scalar_type() == at::kDouble, "z must be a [N, C] float64 tensor");
  TORCH_CHECK(lanes >= 1 && (lanes & (lanes - 1)) == 0, "lanes must be a power of two");
  const auto z = z_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1);
  const double inv_t = 1.0 / temperature;
  auto out = at::empty({N, 4}, z.options());
  const double* src = z.const_data_ptr<double>();
  double* dst = out.mutable_data_ptr<double>();
  std::vector<afd::OnlineRowStats<double>> lane(lanes);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t l = 0; l < lanes; ++l) {
      lane[l] = afd::online_row_stats_empty<double>();
      for (int64_t c = l; c < C; c += lanes) afd::online_row_stats_add(lane[l], src[n * C + c], inv_t);
    }
    for (int64_t offset = lanes / 2; offset > 0; offset /= 2) {  // the warp's shfl_down tree
      for (int64_t l = 0; l < offset; ++l) lane[l] = afd::online_row_stats_merge(lane[l], lane[l + offset], inv_t);
    }
    const auto& s = lane[0];
    dst[n * 4 + 0] = s.max;
    dst[n * 4 + 1] = s.max + std::log(s.sum1);
    dst[n * 4 + 2] = std::log(s.sum_t);
    dst[n * 4 + 3] = s.sum_z;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(afd_fast_test, m) {
  m.def("online_row_stats(Tensor z, float temperature, int lanes) -> Tensor");
}

TORCH_LIBRARY_IMPL(afd_fast_test, CPU, m) {
  m.impl("online_row_stats", &online_row_stats);
}
