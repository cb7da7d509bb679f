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

// One token of a row in the controls' selection: the order key of its scaled logit and its
// mass e^(s - m) (top-p only).
struct Candidate {
  uint32_t key;
  float mass;
};

// Radix selection over order keys (row_math.h): the largest key K such that the candidates
// with key >= K weigh at least `target` (weight: 1 each, or their mass). Three digit levels of
// 11, 11 and 10 bits, most significant first: each builds a histogram of the candidates left
// (float64 weights summed in index order, so the result is reproducible), walks it from the top
// until the running weight reaches the target, and keeps only the candidates of that bin, which
// the next level splits further. After the last level every bit of K is fixed: the floor is
// exact, the k-th largest value itself for top-k. Each level reads what is left once, so a row
// costs about two passes, whatever the values (a selection by pivots was measured 2-4x slower:
// its partitions branch unpredictably and recompute masses). `c` is reordered; when even all of
// it weighs less than the target (rounding in a mass target), the key of -inf (keep all) comes
// back.
FSDFM_INLINE uint32_t select_key(Candidate* c, int64_t n, bool by_mass, double target) {
  constexpr int kShift[3] = {21, 10, 0};
  constexpr uint32_t kDigits[3] = {0x7ff, 0x7ff, 0x3ff};
  // Logits crowd into few bins of the top digit, and consecutive increments of one bin wait
  // for each other: the counts go to 4 interleaved histograms (32-bit, 32 KB: within L1), the
  // masses to 2 (float64), combined per bin in a fixed order.
  uint32_t counts[4][2048];
  double masses[2][2048];
  double hist[2048];
  double acc = 0.0;  // the weight of the keys above the current prefix's bin
  uint32_t key = 0;
  for (int level = 0; level < 3; ++level) {
    const int shift = kShift[level];
    const uint32_t digits = kDigits[level];
    if (by_mass) {
      for (auto& h : masses) std::fill(h, h + digits + 1, 0.0);
      int64_t i = 0;
      for (; i + 2 <= n; i += 2) {
        masses[0][(c[i].key >> shift) & digits] += c[i].mass;
        masses[1][(c[i + 1].key >> shift) & digits] += c[i + 1].mass;
      }
      if (i < n) masses[0][(c[i].key >> shift) & digits] += c[i].mass;
      for (uint32_t b = 0; b <= digits; ++b) hist[b] = masses[0][b] + masses[1][b];
    } else {
      for (auto& h : counts) std::fill(h, h + digits + 1, 0u);
      int64_t i = 0;
      for (; i + 4 <= n; i += 4) {
        for (int j = 0; j < 4; ++j) ++counts[j][(c[i + j].key >> shift) & digits];
      }
      for (; i < n; ++i) ++counts[0][(c[i].key >> shift) & digits];
      for (uint32_t b = 0; b <= digits; ++b) {
        hist[b] = static_cast<double>(counts[0][b]) + counts[1][b] + counts[2][b] + counts[3][b];
      }
    }
    int64_t bin = digits;
    for (; bin >= 0 && acc + hist[bin] < target; --bin) acc += hist[bin];
    if (bin < 0) return order_key(kNegInf);
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (((c[i].key >> shift) & digits) == static_cast<uint32_t>(bin)) c[kept++] = c[i];
    }
    n = kept;
    key |= static_cast<uint32_t>(bin) << shift;
  }
  return key;
}

// The controls' floor of one row (Controls, row_math.h), on the scaled logits; m is the row's
// scaled maximum, `scratch` holds V candidates and `masses` ceil(V / kGroup) floats.
// Top-p's candidates are the tokens top-k kept, and of those only the ones that can matter: with
// M their mass, every token of mass below (1 - top_p) M / (2n) together weighs less than
// (1 - top_p) M / 2, so the floor lies above them all; they are skipped by comparing their
// scaled logit with m + ln((1 - top_p) M / (2n)), no exponential needed, and M itself comes
// from the vectorised block masses. Only the few candidates left get a mass of their own.
template <typename T>
FSDFM_INLINE float control_floor(const T* row, int64_t V, const RowTask& task, float m,
                                 Candidate* scratch, float* masses) {
  const int64_t skip = task.uncounted();
  const Controls& c = task.controls;
  const int64_t n = V - (skip >= 0 && skip < V ? 1 : 0);
  uint32_t floor = order_key(kNegInf);
  if (c.top_k > 0 && c.top_k < n) {
    int64_t kept = 0;
    for (int64_t x = 0; x < V; ++x) {
      if (x != skip) scratch[kept++] = Candidate{order_key(to_float(row[x]) * task.inv_temp), 0.0f};
    }
    floor = select_key(scratch, kept, false, static_cast<double>(c.top_k));
  }
  if (c.top_p < 1.0) {
    const float kept_from = key_value(floor);
    const double mass =
        span_masses(row, V, 0, task.inv_temp, m, kept_from, skip, masses).allowed;
    if (!(mass > 0.0)) return kept_from;
    const double bound = 0.5 * (1.0 - c.top_p) * mass / static_cast<double>(n);
    const float lowest = std::max(kept_from, bound > 0.0 ? m + static_cast<float>(std::log(bound))
                                                         : kNegInf);
    int64_t kept = 0;
    for (int64_t x = 0; x < V; ++x) {
      const float s = to_float(row[x]) * task.inv_temp;
      if (x != skip && s >= lowest) scratch[kept++] = Candidate{order_key(s), exp_nonpos(s - m)};
    }
    floor = std::max(floor, select_key(scratch, kept, true, c.top_p * mass));
  }
  return key_value(floor);
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
// `values` of V candidates (used by the controls only). The row is read twice (the second read
// comes from cache, a GPT-2 row being 100-200 KB): the maximum, then e^(s - m) once per token
// into the block masses; the draw reads one block. Top-k / top-p add about two reads each (their
// radix selection).
template <typename T>
FSDFM_INLINE int64_t draw_row(const T* row, int64_t V, const RowTask& task,
                              const RowUniforms& u, float* masses, Candidate* values) {
  if (!task.valid) return kInvalidToken;
  if (task.greedy) return greedy_row(row, V, task, u);
  float lmax;
  bool bad;
  row_max(row, V, lmax, bad);
  // inv_temp > 0, so the maximum of the scaled logits is the scaled maximum, bit for bit.
  const float m = lmax * task.inv_temp;
  if (!row_is_valid(m, bad)) return kInvalidToken;
  float thr = reach_threshold(m, task.barrier);
  if (task.controls.active(V)) {
    thr = std::max(thr, control_floor(row, V, task, m, values, masses));
  }
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
