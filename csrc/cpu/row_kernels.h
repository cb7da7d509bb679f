// The CPU row kernels of fsdfm: the per-row maths of csrc/fsdfm/row_math.h over rows held in
// memory, shared by the ops (ops_cpu.cpp) and the fused head (head_cpu.cpp).
//
// Rows are streamed in blocks of kGroup tokens whose inner loops the compiler vectorises (kLanes
// independent accumulators, so no floating-point reassociation is needed). The kernels are
// always inlined into per-dtype entry points that each file compiles for AVX2 and for the
// baseline x86-64, the variant being chosen once, when the library loads (GCC / Clang function
// multiversioning, `target_clones`): a shipped build uses the vector width of the CPU it runs on
// without -march=native. kLanes = 8 is one AVX2 vector of floats; both variants do the same IEEE
// operations in the same order (no FMA: the clones do not enable it), so they give the same bits.
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>

#include "fsdfm/row_math.h"
#include "ops_common.h"

#define FSDFM_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FSDFM_ISA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FSDFM_ISA_CLONES
#endif

namespace fsdfm {
namespace cpu {

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

// Masses of a span of n tokens with ids first .. first + n - 1, relative to its scaled maximum m:
// the allowed mass of each block of kGroup tokens in `masses` (ceil(n / kGroup) floats) and the
// totals (total: every token; allowed: the allowed destinations).
template <typename T>
FSDFM_INLINE RowMass span_masses(const T* span, int64_t n, int64_t first, float inv_temp, float m,
                                 float thr, int64_t excluded, float* masses) {
  const int64_t groups = (n + kGroup - 1) / kGroup;
  RowMass mass;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t start = g * kGroup;
    float total, allowed;
    block_mass(span, start, std::min(kGroup, n - start), inv_temp, m, thr, total, allowed);
    mass.total += total;
    masses[g] = allowed;
  }
  if (excluded >= first && excluded < first + n) {
    // Recompute the excluded token's block without it rather than subtracting its mass: when
    // that token dominates the row the subtraction would cancel catastrophically.
    const int64_t g = (excluded - first) / kGroup;
    const int64_t start = g * kGroup;
    const int64_t end = std::min(start + kGroup, n);
    float allowed = 0.0f;
    for (int64_t i = start; i < end; ++i) {
      const float s = to_float(span[i]) * inv_temp;
      if (is_allowed(first + i, s, excluded, thr)) allowed += exp_nonpos(s - m);
    }
    masses[g] = allowed;
  }
  for (int64_t g = 0; g < groups; ++g) mass.allowed += masses[g];
  return mass;
}

// An exact inverse-CDF draw from the allowed tokens of a span (masses from span_masses, whose
// sum `allowed` must be positive), in two levels: a block, then a token in it. Returns its id.
template <typename T>
FSDFM_INLINE int64_t draw_from_span(const T* span, int64_t n, int64_t first, float inv_temp,
                                    float m, float thr, int64_t excluded, const float* masses,
                                    double allowed, double u_group, double u_within) {
  const int64_t groups = (n + kGroup - 1) / kGroup;
  InverseCdf pick_group(u_group, allowed);
  for (int64_t g = 0; g < groups && !pick_group.offer(g, masses[g]); ++g) {
  }
  const int64_t start = pick_group.result() * kGroup;
  const int64_t count = std::min(kGroup, n - start);
  float weights[kGroup];
  double within_total = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    const float s = to_float(span[start + i]) * inv_temp;
    weights[i] = is_allowed(first + start + i, s, excluded, thr) ? exp_nonpos(s - m) : 0.0f;
    within_total += weights[i];
  }
  InverseCdf pick_token(u_within, within_total);
  for (int64_t i = 0; i < count && !pick_token.offer(first + start + i, weights[i]); ++i) {
  }
  return pick_token.result();
}

// Inputs of one row's draw. `excluded` is the destination the row may not take: the current
// token x_t (DrawMode::kJump) or the excluded token (kSample), -1 for none; `valid` is false
// when a per-row token id lies outside [0, V). `greedy`: temperature 0 (inv_temp unused).
struct RowTask {
  DrawMode mode;
  bool valid;
  int64_t excluded;
  float inv_temp;
  float barrier;
  float rate_scale;
  float h;
  bool greedy = false;
  Controls controls = {};

  // The token left out of the controls' floor: the draw's exclusion (the mask), never x_t,
  // which belongs to the destination law of a jump.
  int64_t uncounted() const { return mode == DrawMode::kSample ? excluded : -1; }
};

// Weight of v[0, n): its count, or its mass sum e^(v - m) in float64.
FSDFM_INLINE double weight_of(const float* v, int64_t n, bool by_mass, float m) {
  if (!by_mass) return static_cast<double>(n);
  double w = 0.0;
  for (int64_t i = 0; i < n; ++i) w += exp_nonpos(v[i] - m);
  return w;
}

// A selection's result: the floor, and how many of the values are at least the floor (they are
// then v[0, count)).
struct Kept {
  float floor;
  int64_t count;
};

// Among v[0, n) (scratch, reordered): the largest f such that the values >= f weigh at least
// `target` (weight: 1 per value, or e^(v - m) with by_mass). A three-way quickselect, in
// descending order, on median-of-three pivots: expected O(n), and the floor is exact (it is
// one of the values, not an interpolation). Should 64 rounds not settle it (a row built to
// defeat the pivots), what is left is sorted, so no row costs more than O(n log n). When even
// all of v weighs less than target (rounding in a mass target), everything is kept.
FSDFM_INLINE Kept select_floor(float* v, int64_t n, bool by_mass, double target, float m) {
  int64_t lo = 0, hi = n;  // v[0, lo) is kept, v[hi, n) is not; acc = weight of v[0, lo)
  double acc = 0.0;
  for (int round = 0; lo < hi; ++round) {
    if (round == 64) {
      std::sort(v + lo, v + hi, [](float a, float b) { return a > b; });
      for (int64_t i = lo; i < hi;) {
        int64_t j = i;
        while (j < hi && v[j] == v[i]) ++j;
        acc += weight_of(v + i, j - i, by_mass, m);
        if (acc >= target) return Kept{v[i], j};
        i = j;
      }
      break;
    }
    const float a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    // [lo, gt) > pivot, [gt, i) == pivot, [lt, hi) < pivot.
    int64_t gt = lo, i = lo, lt = hi;
    while (i < lt) {
      if (v[i] > pivot) {
        std::swap(v[gt++], v[i++]);
      } else if (v[i] < pivot) {
        std::swap(v[i], v[--lt]);
      } else {
        ++i;
      }
    }
    const double above = weight_of(v + lo, gt - lo, by_mass, m);
    if (acc + above >= target) {
      hi = gt;  // the floor lies strictly above the pivot
      continue;
    }
    acc += above + weight_of(v + gt, lt - gt, by_mass, m);
    if (acc >= target) return Kept{pivot, lt};
    lo = lt;
  }
  return Kept{kNegInf, n};
}

// The controls' floor of one row (Controls, row_math.h), on the scaled logits; m is the row's
// scaled maximum and `values` scratch of V floats.
template <typename T>
FSDFM_INLINE float control_floor(const T* row, int64_t V, const RowTask& task, float m,
                                 float* values) {
  const int64_t skip = task.uncounted();
  int64_t n = 0;
  for (int64_t x = 0; x < V; ++x) {
    if (x != skip) values[n++] = to_float(row[x]) * task.inv_temp;
  }
  const Controls& c = task.controls;
  float floor = kNegInf;
  if (c.top_k > 0 && c.top_k < n) {
    const Kept k = select_floor(values, n, false, static_cast<double>(c.top_k), m);
    floor = k.floor;
    n = k.count;
  }
  if (c.top_p < 1.0) {
    const double mass = weight_of(values, n, true, m);
    if (mass > 0.0) floor = std::max(floor, select_floor(values, n, true, c.top_p * mass, m).floor);
  }
  return floor;
}

// A row at temperature 0: the argmax (lowest id among ties) of the raw logits, then
// greedy_result. The token left out of the argmax is the draw's exclusion, as for the floor.
// The vectorised maximum comes first; the argmax is then the first token other than the
// exclusion that equals it, found by a scan that stops there. Only when the exclusion is the
// sole maximum does a second, full pass look for the best of the rest.
template <typename T>
FSDFM_INLINE int64_t greedy_row(const T* row, int64_t V, const RowTask& task,
                                const RowUniforms& u) {
  float m;
  bool bad;
  row_max(row, V, m, bad);
  if (!row_is_valid(m, bad)) return kInvalidToken;
  const int64_t skip = task.uncounted();
  int64_t arg = kInvalidToken;
  for (int64_t x = 0; x < V; ++x) {
    if (to_float(row[x]) == m && x != skip) {
      arg = x;
      break;
    }
  }
  if (arg < 0) {
    float best = kNegInf;
    for (int64_t x = 0; x < V; ++x) {
      const float v = to_float(row[x]);
      if (x != skip && beats(v, x, best, arg)) {
        best = v;
        arg = x;
      }
    }
  }
  return greedy_result(task.mode == DrawMode::kJump, arg, task.excluded, task.rate_scale, task.h,
                       u.jump);
}

// One row of jump_step / sample_categorical; `masses` is scratch of ceil(V / kGroup) floats,
// `values` of V floats (used by the controls only). The row is read twice (the second read
// comes from cache, a GPT-2 row being 100-200 KB): the maximum, then e^(s - m) once per token
// into the block masses; the draw reads one block. Top-k / top-p add a copy and a selection.
template <typename T>
FSDFM_INLINE int64_t draw_row(const T* row, int64_t V, const RowTask& task,
                              const RowUniforms& u, float* masses, float* values) {
  if (!task.valid) return kInvalidToken;
  if (task.greedy) return greedy_row(row, V, task, u);
  float lmax;
  bool bad;
  row_max(row, V, lmax, bad);
  // inv_temp > 0, so the maximum of the scaled logits is the scaled maximum, bit for bit.
  const float m = lmax * task.inv_temp;
  if (!row_is_valid(m, bad)) return kInvalidToken;
  float thr = reach_threshold(m, task.barrier);
  if (task.controls.active(V)) thr = std::max(thr, control_floor(row, V, task, m, values));
  const RowMass mass = span_masses(row, V, 0, task.inv_temp, m, thr, task.excluded, masses);
  if (task.mode == DrawMode::kJump) {
    if (!(u.jump < jump_probability(mass, task.rate_scale, task.h))) return task.excluded;
  } else if (!(mass.allowed > 0.0)) {
    return kInvalidToken;  // nothing left to draw from
  }
  return draw_from_span(row, V, 0, task.inv_temp, m, thr, task.excluded, masses, mass.allowed,
                        u.group, u.within);
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

// The task of row r from an op's checked arguments (DrawArgs, HeadArgs): `per_row` holds each
// row's excluded destination (x_t for a jump, an exclusion for a draw) or is empty, and
// rate_scale / h, per sequence, are set for a jump.
inline RowTask row_task(DrawMode mode, const std::optional<at::Tensor>& per_row,
                        int64_t exclude_token, const std::optional<at::Tensor>& rate_scale,
                        const std::optional<at::Tensor>& h, const RowLayout& rows, int64_t r,
                        float inv_temp, float barrier) {
  RowTask task{mode, true, exclude_token, inv_temp, barrier, 0.0f, 0.0f};
  if (per_row) {
    task.excluded = per_row->const_data_ptr<int64_t>()[r];
    task.valid = task.excluded >= 0 && task.excluded < rows.V;
  }
  if (mode == DrawMode::kJump) {
    const int64_t seq = r / rows.L;
    task.rate_scale = rate_scale->const_data_ptr<float>()[seq];
    task.h = h->const_data_ptr<float>()[seq];
  }
  return task;
}

// A fresh 64-bit key from the CPU generator: one per call of an op.
inline uint64_t draw_seed(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

// Rows per parallel task: enough tokens per task to amortise scheduling.
inline int64_t grain_rows(int64_t V) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
}

}  // namespace cpu
}  // namespace fsdfm
