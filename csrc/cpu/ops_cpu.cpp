// CPU kernels of the fsdfm ops: rows in parallel (at::parallel_for, OpenMP threads), each with
// the row kernels of row_kernels.h (AVX2 or baseline, chosen at load). Every row depends only on
// its own Philox counters: the same tokens for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "cpu/row_kernels.h"

namespace fsdfm {
namespace {

using namespace cpu;  // NOLINT: the row kernels

// The per-dtype entry points of the row kernels, one clone per instruction set.
#define FSDFM_ROW_ENTRY_POINTS(T)                                                              \
  FSDFM_ISA_CLONES int64_t draw_row_isa(const T* row, int64_t V, const RowTask& task,           \
                                        const RowUniforms& u, float* masses,                   \
                                        Candidate* values) {                                   \
    return draw_row(row, V, task, u, masses, values);                                          \
  }                                                                                            \
  FSDFM_ISA_CLONES void generator_row_isa(const T* p, T* out, int64_t V, int64_t z, float rate, \
                                          float barrier) {                                     \
    generator_row(p, out, V, z, rate, barrier);                                                \
  }
FSDFM_ROW_ENTRY_POINTS(float)
FSDFM_ROW_ENTRY_POINTS(double)  // instantiated by AT_DISPATCH; rows_of never lets it through
FSDFM_ROW_ENTRY_POINTS(c10::Half)
FSDFM_ROW_ENTRY_POINTS(c10::BFloat16)
#undef FSDFM_ROW_ENTRY_POINTS

// jump_step and sample_categorical: rows in parallel, each from its own Philox counters.
at::Tensor draw_rows(const DrawArgs& a, double barrier, double temperature,
                     const std::optional<at::Generator>& generator) {
  const RowLayout& rows = a.rows;
  auto out = at::empty({rows.B, rows.L}, a.logits.options().dtype(at::kLong));
  int64_t* out_ptr = out.data_ptr<int64_t>();
  const int64_t groups = (rows.V + kGroup - 1) / kGroup;
  const uint64_t seed = draw_seed(generator);
  const auto inv_temp = a.greedy ? 0.0f : static_cast<float>(1.0 / temperature);
  const auto b = static_cast<float>(barrier);
  const bool controls = !a.greedy && a.controls.active(rows.V);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.logits.scalar_type(), "fsdfm_draw",
                                  [&] {
    const scalar_t* base = a.logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows.rows(), grain_rows(rows.V), [&](int64_t begin, int64_t end) {
      std::vector<float> masses(groups);
      std::vector<Candidate> values(controls ? rows.V : 0);
      for (int64_t r = begin; r < end; ++r) {
        const RowUniforms u = row_uniforms(seed, 0, static_cast<uint64_t>(r));
        RowTask task = row_task(a.mode, a.mode == DrawMode::kJump ? a.current : a.exclude,
                                a.exclude_token, a.rate_scale, a.h, rows, r, inv_temp, b);
        task.greedy = a.greedy;
        task.controls = a.controls;
        out_ptr[r] = draw_row_isa(base + rows.offset(r), rows.V, task, u, masses.data(),
                                  values.data());
      }
    });
  });
  return out;
}

at::Tensor jump_step_cpu(const at::Tensor& logits, const at::Tensor& x_t,
                         const at::Tensor& rate_scale, const at::Tensor& h, double barrier,
                         double temperature, int64_t top_k, double top_p,
                         std::optional<at::Generator> generator) {
  return draw_rows(jump_args(logits, x_t, rate_scale, h, barrier, temperature, top_k, top_p),
                   barrier, temperature, generator);
}

at::Tensor sample_categorical_cpu(const at::Tensor& logits,
                                  const std::optional<at::Tensor>& exclude,
                                  int64_t exclude_token, double barrier, double temperature,
                                  int64_t top_k, double top_p,
                                  std::optional<at::Generator> generator) {
  return draw_rows(
      sample_args(logits, exclude, exclude_token, barrier, temperature, top_k, top_p), barrier,
      temperature, generator);
}

at::Tensor probs_to_generator_cpu(const at::Tensor& probs_in, const at::Tensor& x_t_in,
                                  const at::Tensor& rate_scale_in, double barrier) {
  const GeneratorArgs a = generator_args(probs_in, x_t_in, rate_scale_in, barrier);
  const at::Tensor& probs = a.probs;
  const RowLayout& rows = a.rows;
  auto out = at::empty({rows.B, rows.L, rows.V}, probs.options());
  const int64_t* z = a.x_t.const_data_ptr<int64_t>();
  const float* rate = a.rate_scale.const_data_ptr<float>();
  const auto b = static_cast<float>(barrier);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(),
                                  "fsdfm_probs_to_generator", [&] {
    const scalar_t* in = probs.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows.rows(), grain_rows(rows.V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        generator_row_isa(in + rows.offset(r), o + r * rows.V, rows.V, z[r], rate[r / rows.L], b);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fsdfm

TORCH_LIBRARY_IMPL(fsdfm, CPU, m) {
  m.impl("probs_to_generator", &fsdfm::probs_to_generator_cpu);
  m.impl("jump_step", &fsdfm::jump_step_cpu);
  m.impl("sample_categorical", &fsdfm::sample_categorical_cpu);
}
