// Operator schemas of the afd_fast library. Kernels register per dispatch key in ops_cpu.cpp and
// cuda/ops_cuda.cu; fake (meta) kernels and autograd are registered in Python (afd_fast/ops.py).
#include <torch/library.h>

#if defined(AFD_FAST_PYTHON_MODULE)
#include <Python.h>
// `import afd_fast._C` loads this library, whose static initialisers register the operators.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(afd_fast, m) {
  // Forward of the mutual-distillation loss; with compute_grad it also writes d loss_k / d z_k
  // ([K, B, C], logits dtype) so the backward only rescales. Otherwise `grad` is empty.
  // target_b and lam ([B] each, both or neither): soft targets lam * onehot(target) +
  // (1 - lam) * onehot(target_b) per sample (mixup, CutMix).
  m.def(
      "mutual_distillation_forward(Tensor logits, Tensor target, Tensor peer_weights, float "
      "temperature, float ce_weight, float kd_weight, float label_smoothing, bool compute_grad, "
      "Tensor? target_b=None, Tensor? lam=None) -> (Tensor loss, Tensor ce, Tensor kl, Tensor grad)");
  // grad_logits [num_rows, B, C]: row k < K is grad_loss[k] * saved_grad[k], teacher rows are 0.
  m.def("mutual_distillation_backward(Tensor grad_loss, Tensor saved_grad, int num_rows) -> Tensor");
  m.def(
      "lsgan_forward(Tensor d_own, Tensor d_peer, float real_label, float fake_label) -> (Tensor "
      "g_loss, Tensor d_loss)");
  m.def(
      "lsgan_backward(Tensor grad_g, Tensor grad_d, Tensor d_own, Tensor d_peer, float real_label, "
      "float fake_label) -> (Tensor grad_own, Tensor grad_peer)");
}
