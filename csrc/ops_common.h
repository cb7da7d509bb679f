// Argument checks and row addressing shared by the CPU and CUDA implementations of the ops.
// Light ATen headers only: the heavy torch/extension.h is never needed by the kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "fsdfm/row_math.h"

namespace fsdfm {

// How to find row (b, l) of a [B, L, V] tensor whose last dimension is contiguous.
struct RowLayout {
  int64_t B, L, V;
  int64_t stride_b, stride_l;  // in elements

  int64_t rows() const { return B * L; }
  int64_t offset(int64_t row) const { return (row / L) * stride_b + (row % L) * stride_l; }
};

inline bool is_supported_float(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

// [B, L, V] float32 / bfloat16 / float16. Rows may be strided (views such as x[:, ::2]); a
// non-unit stride along V is made contiguous, since every kernel streams along V.
inline at::Tensor rows_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must have shape [B, L, V], got ", t.sizes());
  TORCH_CHECK_TYPE(is_supported_float(t), name,
                   " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(2) >= 1, name, " must have V >= 1 entries per row, got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(2) < (int64_t{1} << 31), name, " has V = ", t.size(2),
                    ": at most 2^31 - 1 entries per row are supported");
  return t.stride(2) == 1 || t.size(2) == 1 ? t : t.contiguous();
}

inline RowLayout layout_of(const at::Tensor& t) {
  return RowLayout{t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1)};
}

// x_t [B, L] int64 on the device of `like`.
inline at::Tensor tokens_of(const at::Tensor& x, const RowLayout& rows, const at::Tensor& like,
                            const char* name) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kLong, name, " must be int64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == rows.B && x.size(1) == rows.L, name,
                    " must have shape [B, L] = [", rows.B, ", ", rows.L, "], got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == like.device(), name, " is on ", x.device(),
                    " but the logits are on ", like.device());
  return x.contiguous();
}

// A per-sequence scalar as a float32 [B] tensor on the device of `like`.
inline at::Tensor per_sequence_of(const at::Tensor& v, int64_t B, const at::Tensor& like,
                                  const char* name) {
  TORCH_CHECK_TYPE(v.scalar_type() == at::kFloat, name, " must be a float32 tensor, got ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == B, name, " must have shape [B] = [", B,
                    "], got ", v.sizes());
  TORCH_CHECK_VALUE(v.device() == like.device(), name, " is on ", v.device(),
                    " but the logits are on ", like.device());
  return v.contiguous();
}

inline void check_barrier(double barrier) {
  TORCH_CHECK_VALUE(barrier >= 0.0, "barrier must be >= 0 (math.inf disables it), got ", barrier);
}

inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "temperature must be a positive finite number, got ", temperature);
}

// The draws' sampling controls (fsdfm/row_math.h): temperature 0 is the argmax, top_k = 0 and
// top_p = 1 are off.
inline Controls controls_of(double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK_VALUE(temperature == 0.0 || (temperature > 0.0 && std::isfinite(temperature)),
                    "temperature must be 0 (argmax) or a positive finite number, got ",
                    temperature);
  TORCH_CHECK_VALUE(top_k >= 0, "top_k must be >= 0 (0 disables it), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0.0 && top_p <= 1.0, "top_p must lie in (0, 1] (1 disables it), got ",
                    top_p);
  return Controls{top_k, top_p};
}

// The optional per-position exclusion: exclude [B, L] int64, or one token id for every
// position (exclude_token >= 0), or nothing (exclude_token = -1 and no tensor).
inline std::optional<at::Tensor> exclusion_of(const std::optional<at::Tensor>& exclude,
                                              int64_t exclude_token, const RowLayout& rows,
                                              const at::Tensor& like) {
  TORCH_CHECK_VALUE(exclude_token >= -1 && exclude_token < rows.V,
                    "exclude must be a token id in [0, V) = [0, ", rows.V, "), got ",
                    exclude_token);
  if (!exclude.has_value()) return std::nullopt;
  TORCH_CHECK_VALUE(exclude_token == -1,
                    "give exclude either as a tensor or as one token id, not both");
  return tokens_of(*exclude, rows, like, "exclude");
}

// The checked arguments of probs_to_generator, shared by both devices.
struct GeneratorArgs {
  at::Tensor probs;
  RowLayout rows;
  at::Tensor x_t;         // [B, L] int64
  at::Tensor rate_scale;  // [B] float32
};

inline GeneratorArgs generator_args(const at::Tensor& probs, const at::Tensor& x_t,
                                    const at::Tensor& rate_scale, double barrier) {
  GeneratorArgs a;
  a.probs = rows_of(probs, "probs");
  a.rows = layout_of(a.probs);
  a.x_t = tokens_of(x_t, a.rows, a.probs, "x_t");
  a.rate_scale = per_sequence_of(rate_scale, a.rows.B, a.probs, "rate_scale");
  check_barrier(barrier);
  return a;
}

// Which op a draw serves: jump_step (stay at x_t or jump to a token other than x_t) or
// sample_categorical (one draw, optionally excluding a token).
enum class DrawMode { kJump, kSample };

// The checked arguments of jump_step and sample_categorical, shared by both devices.
struct DrawArgs {
  DrawMode mode;
  at::Tensor logits;
  RowLayout rows;
  std::optional<at::Tensor> current;     // kJump: x_t [B, L] int64
  std::optional<at::Tensor> exclude;     // kSample: the excluded token per position, or none
  int64_t exclude_token = -1;            // kSample without `exclude`: one id for all, -1 none
  std::optional<at::Tensor> rate_scale;  // kJump: [B] float32
  std::optional<at::Tensor> h;           // kJump: [B] float32
  Controls controls;                     // top-k / top-p
  bool greedy = false;                   // temperature 0: the argmax
};

inline DrawArgs jump_args(const at::Tensor& logits_in, const at::Tensor& x_t,
                          const at::Tensor& rate_scale, const at::Tensor& h, double barrier,
                          double temperature, int64_t top_k, double top_p) {
  DrawArgs a;
  a.controls = controls_of(temperature, top_k, top_p);
  a.greedy = temperature == 0.0;
  a.mode = DrawMode::kJump;
  a.logits = rows_of(logits_in, "logits");
  a.rows = layout_of(a.logits);
  a.current = tokens_of(x_t, a.rows, a.logits, "x_t");
  a.rate_scale = per_sequence_of(rate_scale, a.rows.B, a.logits, "rate_scale");
  a.h = per_sequence_of(h, a.rows.B, a.logits, "h");
  check_barrier(barrier);
  return a;
}

inline DrawArgs sample_args(const at::Tensor& logits_in, const std::optional<at::Tensor>& exclude,
                            int64_t exclude_token, double barrier, double temperature,
                            int64_t top_k, double top_p) {
  DrawArgs a;
  a.controls = controls_of(temperature, top_k, top_p);
  a.greedy = temperature == 0.0;
  a.mode = DrawMode::kSample;
  a.logits = rows_of(logits_in, "logits");
  a.rows = layout_of(a.logits);
  a.exclude = exclusion_of(exclude, exclude_token, a.rows, a.logits);
  a.exclude_token = exclude_token;
  check_barrier(barrier);
  return a;
}

// The checked arguments of the fused head ops (head_jump_step, head_sample_categorical): the
// final hidden states [B, L, d], the output layer's weight [V, d] and bias [V] (or none), all of
// one floating dtype and device, and the draw's own arguments as in DrawArgs.
struct HeadArgs {
  DrawMode mode;
  at::Tensor hidden;  // [B * L, d], contiguous
  at::Tensor weight;  // [V, d]
  std::optional<at::Tensor> bias;  // [V]
  RowLayout rows;     // B, L, V (strides unused: rows are made tile by tile)
  int64_t d;
  std::optional<at::Tensor> current;     // kJump: x_t [B, L]
  int64_t exclude_token = -1;            // kSample: one excluded id, -1 for none
  std::optional<at::Tensor> rate_scale;  // kJump: [B]
  std::optional<at::Tensor> h;           // kJump: [B]
};

inline HeadArgs head_args(const at::Tensor& hidden, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, double barrier,
                          double temperature) {
  TORCH_CHECK_VALUE(hidden.dim() == 3, "hidden must have shape [B, L, d], got ", hidden.sizes());
  TORCH_CHECK_TYPE(is_supported_float(hidden), "hidden must be float32, bfloat16 or float16, got ",
                   hidden.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(2),
                    "weight must have shape [V, d] with d = ", hidden.size(2), ", got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(0) < (int64_t{1} << 31),
                    "weight must have 1 <= V < 2^31 rows, got ", weight.size(0));
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "weight is ",
                   weight.scalar_type(), " but hidden is ", hidden.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), "weight is on ", weight.device(),
                    " but hidden is on ", hidden.device());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "bias must have shape [V] = [", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), "bias is ",
                     bias->scalar_type(), " but hidden is ", hidden.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == hidden.device(), "bias is on ", bias->device(),
                      " but hidden is on ", hidden.device());
  }
  check_barrier(barrier);
  check_temperature(temperature);
  HeadArgs a;
  a.rows = RowLayout{hidden.size(0), hidden.size(1), weight.size(0), 0, 0};
  a.d = hidden.size(2);
  // Sampling has no gradient: the products below are made on detached views.
  a.hidden = hidden.detach().reshape({a.rows.rows(), a.d}).contiguous();
  a.weight = weight.detach();
  if (bias) a.bias = bias->detach().contiguous();
  return a;
}

inline HeadArgs head_jump_args(const at::Tensor& hidden, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& x_t,
                               const at::Tensor& rate_scale, const at::Tensor& h, double barrier,
                               double temperature) {
  HeadArgs a = head_args(hidden, weight, bias, barrier, temperature);
  a.mode = DrawMode::kJump;
  a.current = tokens_of(x_t, a.rows, hidden, "x_t");
  a.rate_scale = per_sequence_of(rate_scale, a.rows.B, hidden, "rate_scale");
  a.h = per_sequence_of(h, a.rows.B, hidden, "h");
  return a;
}

inline HeadArgs head_sample_args(const at::Tensor& hidden, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, int64_t exclude_token,
                                 double barrier, double temperature) {
  HeadArgs a = head_args(hidden, weight, bias, barrier, temperature);
  a.mode = DrawMode::kSample;
  TORCH_CHECK_VALUE(exclude_token >= -1 && exclude_token < a.rows.V,
                    "exclude must be a token id in [0, V) = [0, ", a.rows.V, "), got ",
                    exclude_token);
  a.exclude_token = exclude_token;
  return a;
}

}  // namespace fsdfm
