// Torch binding of the RMSNorm CUDA kernels: checks, allocation, stream, then the
// torch-free launchers of csrc/cuda/rms_norm.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

#include "fastllm/cuda/rms_norm.h"
#include "fastllm/cuda_binding.h"
#include "fastllm/rms_norm_checks.h"

namespace fastllm::cuda {
namespace {

at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options());
  maybe_poison(out);
  return out;
}

at::Tensor rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cuda(x, "x");
  check_rms_norm_inputs(x, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  const at::Tensor w = weight.to(acc_scalar_type(x)).contiguous();
  at::Tensor y = new_output(x);
  C10_CUDA_CHECK(rms_norm_fwd(x.const_data_ptr(), w.const_data_ptr(), y.mutable_data_ptr(), rows,
                              hidden, eps, to_dtype(x, "x"), c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_out,
                                                     const at::Tensor& x,
                                                     const at::Tensor& weight, double eps) {
  check_cuda(x, "x");
  check_rms_norm_inputs(x, weight, eps);
  check_rms_norm_grad(grad_out, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t hidden = x.size(-1);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  const at::Tensor w = weight.to(acc_scalar_type(x)).contiguous();
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 2 * sm_count(x))));
  at::Tensor dx = new_output(x);
  at::Tensor partial = at::empty({blocks, hidden}, x.options().dtype(acc_scalar_type(x)));
  C10_CUDA_CHECK(rms_norm_bwd(grad_out.const_data_ptr(), x.const_data_ptr(), w.const_data_ptr(),
                              dx.mutable_data_ptr(), partial.mutable_data_ptr(), rows, hidden, eps,
                              blocks, to_dtype(x, "x"), c10::cuda::getCurrentCUDAStream()));
  return {dx, partial.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastllm, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
}

}  // namespace fastllm::cuda
