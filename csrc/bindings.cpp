// The operator schemas of fsdfm (namespace `fsdfm`) and the Python module `fsdfm._C`.
//
// Kernels register themselves per device with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda); the
// fake (meta) kernels used by torch.compile live in Python (fsdfm/ops.py). Importing the module
// is all it takes to make torch.ops.fsdfm.* available.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fsdfm, m) {
  // rates[b, l, x] = max(rate_scale[b] * (probs[b, l, x] - [x == x_t[b, l]]), 0) for reachable
  // x != x_t[b, l]; 0 elsewhere. [B, L, V] in the dtype of probs.
  m.def("probs_to_generator(Tensor probs, Tensor x_t, Tensor rate_scale, float barrier) -> Tensor");
  // One FS-DFM / Euler jump per position: x_next [B, L] int64. temperature 0 is the argmax;
  // top_k (0: off) and top_p (1: off) restrict the destinations as the barrier does.
  m.def(
      "jump_step(Tensor logits, Tensor x_t, Tensor rate_scale, Tensor h, float barrier, "
      "float temperature, int top_k, float top_p, Generator? generator) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // One categorical draw per position from softmax(logits / temperature), restricted by the
  // barrier, top-k / top-p and the exclusion: tokens [B, L] int64.
  m.def(
      "sample_categorical(Tensor logits, Tensor? exclude, int exclude_token, float barrier, "
      "float temperature, int top_k, float top_p, Generator? generator) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  // The fused head: jump_step and sample_categorical on logits = hidden @ weight^T + bias
  // (hidden [B, L, d], weight [V, d], bias [V]) made a vocabulary tile at a time, never whole.
  m.def(
      "head_jump_step(Tensor hidden, Tensor weight, Tensor? bias, Tensor x_t, Tensor rate_scale, "
      "Tensor h, float barrier, float temperature, Generator? generator) -> Tensor",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "head_sample_categorical(Tensor hidden, Tensor weight, Tensor? bias, int exclude_token, "
      "float barrier, float temperature, Generator? generator) -> Tensor",
      {at::Tag::nondeterministic_seeded});
}

// The module exists so that `import fsdfm._C` loads the library; its one function says how the
// CPU kernels were built: the OpenMP version (yyyymm) when at::parallel_for runs on OpenMP
// threads, 0 when every row runs on the calling thread.
static PyObject* openmp_version(PyObject*, PyObject*) {
#if defined(_OPENMP)
  return PyLong_FromLong(_OPENMP);
#else
  return PyLong_FromLong(0);
#endif
}

PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"openmp_version", openmp_version, METH_NOARGS, "OpenMP version of the CPU kernels, or 0"},
      {nullptr, nullptr, 0, nullptr}};
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
