// The fused head on the CPU: head_jump_step / head_sample_categorical draw from
// softmax((hidden W^T + b) / temperature) without ever holding the [B*L, V] logits.
//
// Mapping. Rows are taken kHeadRows at a time (parallel over these blocks, OpenMP threads); for
// each block the vocabulary is walked in tiles of kHeadTile tokens, in a fixed order: the
// block's logits tile (kHeadRows x kHeadTile, 512 KB in fp32, an L2-sized buffer of the thread)
// is one matrix product (at::addmm_out, single-threaded inside the parallel region), then every
// row of the tile is reduced by the row kernels of row_kernels.h (its maximum, its masses, one
// draw from its allowed tokens) and folded into the row's HeadRow (fsdfm/row_math.h). A finite
// barrier needs each row's maximum over the whole vocabulary before any token's reachability is
// known: a first walk over the tiles computes it, at the cost of a second product.
//
// Reproducibility. The draws of row r use only the Philox counters of (r, tile) and the tiles are
// visited in order; a block's product has the same shape whatever the thread count. So the same
// seed gives the same tokens with any number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <vector>

#include "cpu/row_kernels.h"

namespace fsdfm {
namespace {

using namespace cpu;  // NOLINT: the row kernels

constexpr int64_t kHeadRows = 64;    // rows per block (and per product)
constexpr int64_t kHeadTile = 2048;  // vocabulary entries per tile

// Pass 1 over one row of a tile: its maximum (folded into `m`, `bad`) for the barrier.
template <typename T>
FSDFM_INLINE void tile_max(const T* tile_row, int64_t n, float inv_temp, float& m, bool& bad) {
  float tm;
  bool tile_bad;
  row_max(tile_row, n, tm, tile_bad);
  m = std::max(m, tm * inv_temp);
  bad = bad || tile_bad;
}

// Pass 2 over one row of a tile: its statistics and one draw, folded into the row's state.
template <typename T>
FSDFM_INLINE void tile_fold(const T* tile_row, int64_t n, int64_t first, const RowTask& task,
                            float thr, const TileUniforms& u, HeadRow& state, float* masses) {
  float lmax;
  bool bad;
  row_max(tile_row, n, lmax, bad);
  const float m = lmax * task.inv_temp;
  if (bad || !(m > kNegInf) || !(m < INFINITY)) {
    state.fold(m, RowMass{}, kInvalidToken, bad || m == INFINITY, u.merge);
    return;
  }
  const RowMass mass = span_masses(tile_row, n, first, task.inv_temp, m, thr, task.excluded,
                                   masses);
  const int64_t token = mass.allowed > 0.0
                            ? draw_from_span(tile_row, n, first, task.inv_temp, m, thr,
                                             task.excluded, masses, mass.allowed, u.group,
                                             u.within)
                            : kInvalidToken;
  state.fold(m, mass, token, false, u.merge);
}

// The per-dtype entry points, one clone per instruction set (see row_kernels.h).
#define FSDFM_HEAD_ENTRY_POINTS(T)                                                             \
  FSDFM_ISA_CLONES void tile_max_isa(const T* tile_row, int64_t n, float inv_temp, float& m,   \
                                     bool& bad) {                                              \
    tile_max(tile_row, n, inv_temp, m, bad);                                                   \
  }                                                                                            \
  FSDFM_ISA_CLONES void tile_fold_isa(const T* tile_row, int64_t n, int64_t first,             \
                                      const RowTask& task, float thr, const TileUniforms& u,   \
                                      HeadRow& state, float* masses) {                         \
    tile_fold(tile_row, n, first, task, thr, u, state, masses);                                \
  }
FSDFM_HEAD_ENTRY_POINTS(float)
FSDFM_HEAD_ENTRY_POINTS(double)  // instantiated by AT_DISPATCH; head_args never lets it through
FSDFM_HEAD_ENTRY_POINTS(c10::Half)
FSDFM_HEAD_ENTRY_POINTS(c10::BFloat16)
#undef FSDFM_HEAD_ENTRY_POINTS

at::Tensor head_rows(const HeadArgs& a, double barrier, double temperature,
                     const std::optional<at::Generator>& generator) {
  const int64_t N = a.rows.rows(), V = a.rows.V;
  auto out = at::empty({a.rows.B, a.rows.L}, a.hidden.options().dtype(at::kLong));
  int64_t* out_ptr = out.data_ptr<int64_t>();
  const uint64_t seed = draw_seed(generator);
  const auto inv_temp = static_cast<float>(1.0 / temperature);
  const auto b = static_cast<float>(barrier);
  const bool finite_barrier = b < INFINITY;
  const int64_t tiles = (V + kHeadTile - 1) / kHeadTile;
  const int64_t blocks = (N + kHeadRows - 1) / kHeadRows;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.hidden.scalar_type(), "fsdfm_head",
                                  [&] {
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      // The products are kernels' internals: below autograd (grad mode is thread-local, and
      // OpenMP workers start with it on whatever the caller's).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor buffer = at::empty({kHeadRows * kHeadTile}, a.hidden.options());
      std::vector<HeadRow> state(kHeadRows);
      std::vector<float> row_max_scaled(kHeadRows);
      std::vector<char> row_bad(kHeadRows);
      std::vector<float> masses((kHeadTile + kGroup - 1) / kGroup);
      std::vector<RowTask> task(kHeadRows);
      // The logits tile [n, cols] of rows r0 .. r0 + n - 1 and vocabulary entries first ..
      // first + cols - 1, contiguous in the buffer.
      const auto product = [&](int64_t r0, int64_t n, int64_t first, int64_t cols) {
        at::Tensor tile = buffer.narrow(0, 0, n * cols).view({n, cols});
        const at::Tensor rows = a.hidden.narrow(0, r0, n);
        const at::Tensor w = a.weight.narrow(0, first, cols).t();
        if (a.bias) {
          at::addmm_out(tile, a.bias->narrow(0, first, cols), rows, w);
        } else {
          at::mm_out(tile, rows, w);
        }
        return tile.const_data_ptr<scalar_t>();
      };
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t r0 = block * kHeadRows;
        const int64_t n = std::min(kHeadRows, N - r0);
        for (int64_t i = 0; i < n; ++i) {
          state[i] = HeadRow{};
          task[i] = row_task(a.mode, a.current, a.exclude_token, a.rate_scale, a.h, a.rows,
                             r0 + i, inv_temp, b);
          row_max_scaled[i] = kNegInf;
          row_bad[i] = 0;
        }
        if (finite_barrier) {
          for (int64_t k = 0; k < tiles; ++k) {
            const int64_t first = k * kHeadTile, cols = std::min(kHeadTile, V - first);
            const scalar_t* tile = product(r0, n, first, cols);
            for (int64_t i = 0; i < n; ++i) {
              bool bad = row_bad[i] != 0;
              tile_max_isa(tile + i * cols, cols, inv_temp, row_max_scaled[i], bad);
              row_bad[i] = bad;
            }
          }
        }
        for (int64_t k = 0; k < tiles; ++k) {
          const int64_t first = k * kHeadTile, cols = std::min(kHeadTile, V - first);
          const scalar_t* tile = product(r0, n, first, cols);
          for (int64_t i = 0; i < n; ++i) {
            const float thr = finite_barrier ? reach_threshold(row_max_scaled[i], b) : kNegInf;
            const TileUniforms u = tile_uniforms(seed, 0, static_cast<uint64_t>(r0 + i), k);
            tile_fold_isa(tile + i * cols, cols, first, task[i], thr, u, state[i],
                          masses.data());
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = r0 + i;
          const RowTask& t = task[i];
          const double u_jump = row_uniforms(seed, 0, static_cast<uint64_t>(r)).jump;
          out_ptr[r] = t.valid ? state[i].result(t.mode == DrawMode::kJump, t.excluded,
                                                 t.rate_scale, t.h, u_jump)
                               : kInvalidToken;
        }
      }
    });
  });
  return out;
}

at::Tensor head_jump_step_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& x_t,
                              const at::Tensor& rate_scale, const at::Tensor& h, double barrier,
                              double temperature, std::optional<at::Generator> generator) {
  return head_rows(head_jump_args(hidden, weight, bias, x_t, rate_scale, h, barrier, temperature),
                   barrier, temperature, generator);
}

at::Tensor head_sample_categorical_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias,
                                       int64_t exclude_token, double barrier, double temperature,
                                       std::optional<at::Generator> generator) {
  return head_rows(head_sample_args(hidden, weight, bias, exclude_token, barrier, temperature),
                   barrier, temperature, generator);
}

}  // namespace
}  // namespace fsdfm

TORCH_LIBRARY_IMPL(fsdfm, CPU, m) {
  m.impl("head_jump_step", &fsdfm::head_jump_step_cpu);
  m.impl("head_sample_categorical", &fsdfm::head_sample_categorical_cpu);
}
