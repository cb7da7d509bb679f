// CPU kernels of the fsdfm ops: rows in parallel (at::parallel_for, OpenMP threads), each row
// streamed in blocks of kGroup tokens whose inner loops the compiler vectorises (kLanes
// independent accumulators, so no floating-point reassociation is needed).
//
// Instruction sets: the row kernels are compiled for AVX2 and for the baseline x86-64 and the
// variant is chosen once, when the library loads (GCC / Clang function multiversioning,
// `target_clones`), so a shipped build uses the vector width of the CPU it runs on without
// -march=native. kLanes = 8 is one AVX2 vector of floats; both variants do the same IEEE
// operations in the same order (no FMA: the clones do not enable it), so they give the same
// bits, and every row depends only on its own counters: the same tokens for any thread count.
//
// A row of jump_step / sample_categorical is read twice (the second read comes from cache,
// a GPT-2 row being 100-200 KB): pass 0 finds the maximum, pass 1 computes e^(s - m) once per
// token and keeps one allowed mass per block. The draw then needs no further pass over the
// row: an inverse-CDF over the block masses picks a block, a second one a token inside it.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <vector>

#include "fsdfm/row_math.h"
#include "ops_common.h"

// The row kernels are always inlined into the per-dtype entry points below, so that each
// instruction-set clone of an entry point holds its own vectorised copy of the loops.
#define FSDFM_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FSDFM_ISA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FSDFM_ISA_CLONES
#endif

namespace fsdfm {
namespace {

constexpr int64_t kGroup = 64;  // tokens per block of the two-level draw
constexpr int kLanes = 8;       // independent accumulators per inner loop (a vector's width)

template <typename T>
FSDFM_INLINE float to_float(T v) {
  return static_cast<float>(v);
}

// Pass 0: maximum of a row and whether it holds a NaN.
template <typename T>
FSDFM_INLINE void row_max(const T* row, int64_t V, float& m_out, bool& bad_out) {
  float m[kLanes];
  int nan[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    m[j] = kNegInf;
    nan[j] = 0;
  }
  int64_t x = 0;
  for (; x + kLanes <= V; x += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = to_float(row[x + j]);
      m[j] = v > m[j] ? v : m[j];
      nan[j] |= v != v;
    }
  }
  for (; x < V; ++x) {
    const float v = to_float(row[x]);
    m[0] = v > m[0] ? v : m[0];
    nan[0] |= v != v;
  }
  float mm = kNegInf;
  int any_nan = 0;
  for (int j = 0; j < kLanes; ++j) {
    mm = m[j] > mm ? m[j] : mm;
    any_nan |= nan[j];
  }
  m_out = mm;
  bad_out = any_nan != 0;
}

// Masses of one block of n <= kGroup tokens starting at `first`: every token (total) and the
// reachable ones (s >= thr). The excluded token is handled by the caller.
template <typename T>
FSDFM_INLINE void block_mass(const T* row, int64_t first, int64_t n, float inv_temp, float m, float thr,
                       float& total, float& allowed) {
  float tot[kLanes] = {};
  float al[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float s = to_float(row[first + i + j]) * inv_temp;
      const float e = exp_nonpos(s - m);
      tot[j] += e;
      al[j] += s >= thr ? e : 0.0f;
    }
  }
  for (; i < n; ++i) {
    const float s = to_float(row[first + i]) * inv_temp;
    const float e = exp_nonpos(s - m);
    tot[0] += e;
    al[0] += s >= thr ? e : 0.0f;
  }
  total = 0.0f;
  allowed = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    total += tot[j];
    allowed += al[j];
  }
}

// Inputs of one row's draw. `excluded` is the destination the row may not take: the current
// token x_t (DrawMode::kJump) or the excluded token (kSample), -1 for none; `valid` is false
// when a per-row token id lies outside [0, V).
struct RowTask {
  DrawMode mode;
  bool valid;
  int64_t excluded;
  float inv_temp;
  float barrier;
  float rate_scale;
  float h;
};

// One row of jump_step / sample_categorical; `masses` is scratch of ceil(V / kGroup) floats.
template <typename T>
FSDFM_INLINE int64_t draw_row(const T* row, int64_t V, const RowTask& task, const RowUniforms& u,
                 float* masses) {
  if (!task.valid) return kInvalidToken;
  float lmax;
  bool bad;
  row_max(row, V, lmax, bad);
  // inv_temp > 0, so the maximum of the scaled logits is the scaled maximum, bit for bit.
  const float m = lmax * task.inv_temp;
  if (!row_is_valid(m, bad)) return kInvalidToken;
  const float thr = reach_threshold(m, task.barrier);

  const int64_t groups = (V + kGroup - 1) / kGroup;
  RowMass mass;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * kGroup;
    float total, allowed;
    block_mass(row, first, std::min(kGroup, V - first), task.inv_temp, m, thr, total, allowed);
    mass.total += total;
    masses[g] = allowed;
  }
  if (task.excluded >= 0) {
    // Recompute the excluded token's block without it rather than subtracting its mass: when
    // that token dominates the row the subtraction would cancel catastrophically.
    const int64_t g = task.excluded / kGroup;
    const int64_t first = g * kGroup;
    const int64_t n = std::min(kGroup, V - first);
    float allowed = 0.0f;
    for (int64_t x = first; x < first + n; ++x) {
      const float s = to_float(row[x]) * task.inv_temp;
      if (is_allowed(x, s, task.excluded, thr)) allowed += exp_nonpos(s - m);
    }
    masses[g] = allowed;
  }
  for (int64_t g = 0; g < groups; ++g) mass.allowed += masses[g];

  if (task.mode == DrawMode::kJump) {
    if (!(u.jump < jump_probability(mass, task.rate_scale, task.h))) return task.excluded;
  } else if (!(mass.allowed > 0.0)) {
    return kInvalidToken;  // nothing left to draw from
  }

  InverseCdf pick_group(u.group, mass.allowed);
  for (int64_t g = 0; g < groups && !pick_group.offer(g, masses[g]); ++g) {
  }
  const int64_t g = pick_group.result();
  const int64_t first = g * kGroup;
  const int64_t n = std::min(kGroup, V - first);
  float weights[kGroup];
  double within_total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t x = first + i;
    const float s = to_float(row[x]) * task.inv_temp;
    weights[i] = is_allowed(x, s, task.excluded, thr) ? exp_nonpos(s - m) : 0.0f;
    within_total += weights[i];
  }
  InverseCdf pick_token(u.within, within_total);
  for (int64_t i = 0; i < n && !pick_token.offer(first + i, weights[i]); ++i) {
  }
  return pick_token.result();
}

// rates = max(rate_scale (p - onehot(z)), 0) on reachable x != z, 0 elsewhere; a row with a
// NaN or negative probability or an out-of-range z is filled with NaN.
template <typename T>
FSDFM_INLINE void generator_row(const T* p, T* out, int64_t V, int64_t z, float rate, float barrier) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  bool bad = z < 0 || z >= V;
  float thr = kNegInf;
  if (!bad && barrier < INFINITY) {
    float pmax;
    row_max(p, V, pmax, bad);
    thr = pmax * std::exp(-barrier);
  }
  const float r = rate > 0.0f ? rate : 0.0f;
  int neg = 0;
  for (int64_t x = 0; x < V && !bad; ++x) {
    const float v = to_float(p[x]);
    neg |= !(v >= 0.0f);  // also true for NaN
    out[x] = static_cast<T>(v >= thr ? r * v : 0.0f);
  }
  if (bad || neg) {
    for (int64_t x = 0; x < V; ++x) out[x] = static_cast<T>(nan);
  } else {
    out[z] = static_cast<T>(0.0f);
  }
}

// The per-dtype entry points of the row kernels, one clone per instruction set.
#define FSDFM_ROW_ENTRY_POINTS(T)                                                              \
  FSDFM_ISA_CLONES int64_t draw_row_isa(const T* row, int64_t V, const RowTask& task,           \
                                        const RowUniforms& u, float* masses) {                 \
    return draw_row(row, V, task, u, masses);                                                  \
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

uint64_t draw_seed(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

// Rows per parallel task: enough tokens per task to amortise scheduling.
int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
}

// The task of row r from the checked arguments of either op.
RowTask row_task(const DrawArgs& a, int64_t r, float inv_temp, float barrier) {
  RowTask task{a.mode, true, a.exclude_token, inv_temp, barrier, 0.0f, 0.0f};
  const std::optional<at::Tensor>& per_row = a.mode == DrawMode::kJump ? a.current : a.exclude;
  if (per_row) {
    task.excluded = per_row->const_data_ptr<int64_t>()[r];
    task.valid = task.excluded >= 0 && task.excluded < a.rows.V;
  }
  if (a.mode == DrawMode::kJump) {
    const int64_t seq = r / a.rows.L;
    task.rate_scale = a.rate_scale->const_data_ptr<float>()[seq];
    task.h = a.h->const_data_ptr<float>()[seq];
  }
  return task;
}

// jump_step and sample_categorical: rows in parallel, each from its own Philox counters.
at::Tensor draw_rows(const DrawArgs& a, double barrier, double temperature,
                     const std::optional<at::Generator>& generator) {
  const RowLayout& rows = a.rows;
  auto out = at::empty({rows.B, rows.L}, a.logits.options().dtype(at::kLong));
  int64_t* out_ptr = out.data_ptr<int64_t>();
  const int64_t groups = (rows.V + kGroup - 1) / kGroup;
  const uint64_t seed = draw_seed(generator);
  const auto inv_temp = static_cast<float>(1.0 / temperature);
  const auto b = static_cast<float>(barrier);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.logits.scalar_type(), "fsdfm_draw",
                                  [&] {
    const scalar_t* base = a.logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows.rows(), grain_rows(rows.V), [&](int64_t begin, int64_t end) {
      std::vector<float> masses(groups);
      for (int64_t r = begin; r < end; ++r) {
        const RowUniforms u = row_uniforms(seed, 0, static_cast<uint64_t>(r));
        out_ptr[r] = draw_row_isa(base + rows.offset(r), rows.V, row_task(a, r, inv_temp, b), u,
                                  masses.data());
      }
    });
  });
  return out;
}

at::Tensor jump_step_cpu(const at::Tensor& logits, const at::Tensor& x_t,
                         const at::Tensor& rate_scale, const at::Tensor& h, double barrier,
                         double temperature, std::optional<at::Generator> generator) {
  return draw_rows(jump_args(logits, x_t, rate_scale, h, barrier, temperature), barrier,
                   temperature, generator);
}

at::Tensor sample_categorical_cpu(const at::Tensor& logits,
                                  const std::optional<at::Tensor>& exclude,
                                  int64_t exclude_token, double barrier, double temperature,
                                  std::optional<at::Generator> generator) {
  return draw_rows(sample_args(logits, exclude, exclude_token, barrier, temperature), barrier,
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
