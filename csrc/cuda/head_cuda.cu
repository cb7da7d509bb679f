// The fused head on CUDA: head_jump_step / head_sample_categorical draw from
// softmax((hidden W^T + b) / temperature) without ever holding the [B*L, V] logits.
//
// Mapping. Rows are taken in chunks and the vocabulary in tiles of kTile tokens, in a fixed
// order. For each (chunk, tile) the logits tile [rows, kTile] is one tensor-core product
// (cuBLAS through at::addmm_out, fp32 accumulation, in the inputs' dtype) into a buffer of about
// kBufferBytes that is reused for every tile, so it can stay in L2 between the product and its
// reader; then head_tile_kernel reads it with the stages of the ops' draw (draw_stages.cuh: one
// 256-thread block per row, 16-byte loads, the unit-wise OnlineSoftmax, the two-level draw from
// the tile's allowed tokens) and folds the tile into the row's HeadRow (fsdfm/row_math.h) in
// global memory. head_finish_kernel then decides stay or jump per row. A finite barrier needs
// each row's maximum over the whole vocabulary first: head_max_kernel over a first walk of the
// tiles, at the cost of a second product.
//
// Bytes: every logit is written once by the product and read once (plus the two re-reads of the
// chosen group's V / 256 entries, from L1 / L2), into a buffer of kBufferBytes rather than an
// [N, V] tensor; HeadRow state is 40 bytes per row. Noise: the generator's Philox state is taken
// capture-safely for head_words(tiles) outputs per row (the row's stay/jump uniform and three
// per tile), so the tokens do not depend on the number of SMs or on the chunking.
#include <ATen/core/Generator.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <tuple>

#include "cuda/draw_stages.cuh"

namespace fsdfm {
namespace {

using namespace cuda;  // NOLINT: the stages of the row kernels

constexpr int64_t kTile = 8192;                 // vocabulary entries per tile
constexpr int64_t kBufferBytes = int64_t{24} << 20;  // one logits tile of a chunk: half an H200 L2

struct TileParams {
  const void* tile;  // [rows, cols] contiguous: the chunk's logits for vocabulary first ..
  int cols;          // .. first + cols - 1
  int64_t first;
  int64_t tile_index;
  int64_t row0;      // global index of the chunk's first row
  DrawMode mode;
  const int64_t* current;  // kJump: x_t [N]
  int64_t exclude_token;   // kSample: one excluded id, -1 for none
  float inv_temperature;
  float barrier;
  const float* row_max;    // [N] scaled row maxima with a finite barrier, else null
  at::PhiloxCudaState philox;
  HeadRow* state;          // [N]
};

__global__ void head_init_kernel(HeadRow* state, float* row_max, int64_t n) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  state[r] = HeadRow{};
  row_max[r] = kNegInf;
}

// A finite barrier's first walk: the running maximum of each row's scaled logits.
template <typename T>
__global__ void __launch_bounds__(kThreads) head_max_kernel(const TileParams p, float* row_max) {
  using Bits = typename Elem<T>::Bits;
  __shared__ float s_warp[kWarps];
  const InRow<T> row(static_cast<const Bits*>(p.tile) + blockIdx.x * static_cast<int64_t>(p.cols),
                     p.cols);
  float mt = kNegInf;
  for_each_unit(row, threadIdx.x, [&](int, const auto& v) {
#pragma unroll
    for (const float x : v) mt = max_nan(mt, x * p.inv_temperature);
  });
  bool any_bad;
  const float m = block_max(mt, !(mt == mt), any_bad, s_warp);
  if (threadIdx.x == 0) {
    float& slot = row_max[p.row0 + blockIdx.x];
    slot = any_bad ? NAN : max_nan(slot, m);  // NaN: no reachable token, the fold marks it bad
  }
}

// One tile of one row: the tile's statistics and a draw from its allowed tokens, folded into the
// row's state by lane 0 (one block per row and one launch per tile: no two writers).
template <typename T>
__global__ void __launch_bounds__(kThreads) head_tile_kernel(const TileParams p) {
  using Bits = typename Elem<T>::Bits;
  __shared__ float s_max[kThreads];
  __shared__ float s_total[kThreads];
  __shared__ float s_allowed[kThreads];

  const int t = threadIdx.x;
  const int64_t r = p.row0 + blockIdx.x;
  const InRow<T> row(static_cast<const Bits*>(p.tile) + blockIdx.x * static_cast<int64_t>(p.cols),
                     p.cols);
  // The excluded destination as an index of this tile; -1 (never an index) when it lies in
  // another tile or there is none. An x_t outside [0, V) is reported by head_finish_kernel.
  const int64_t excluded_id = p.mode == DrawMode::kJump ? __ldg(p.current + r) : p.exclude_token;
  const int excluded = excluded_id >= p.first && excluded_id < p.first + p.cols
                           ? static_cast<int>(excluded_id - p.first)
                           : -1;
  const float inv_temp = p.inv_temperature;
  const bool finite_barrier = p.row_max != nullptr;
  const float thr = finite_barrier ? reach_threshold(p.row_max[r], p.barrier) : kNegInf;
  const bool bad = block_statistics(row, inv_temp, excluded, thr, finite_barrier, s_max, s_total,
                                    s_allowed);
  if (t >= 32) return;

  // ---- Warp 0 from here on.
  const int lane = t;
  const Groups groups = combine_groups(s_max, s_total, s_allowed, lane);
  HeadRow& state = p.state[r];
  if (bad || !(groups.m > kNegInf) || !(groups.m < INFINITY)) {
    // NaN or +inf make the row invalid; a tile of -inf logits adds nothing.
    if (lane == 0) state.fold(groups.m, RowMass{}, kInvalidToken, bad || groups.m == INFINITY, 0.0);
    return;
  }
  const auto seeds = at::cuda::philox::unpack(p.philox);
  const TileUniforms u = tile_uniforms(std::get<0>(seeds), std::get<1>(seeds),
                                       static_cast<uint64_t>(r), static_cast<uint64_t>(p.tile_index));
  int64_t token = kInvalidToken;
  if (groups.mass.allowed > 0.0) {  // warp-uniform: every lane holds the same total
    const int j = choose_group(groups, u.group, lane);
    token = p.first + choose_token(row, j, s_max[j], inv_temp, excluded, thr, u.within, lane);
  }
  if (lane == 0) state.fold(groups.m, groups.mass, token, false, u.merge);
}

struct FinishParams {
  const HeadRow* state;
  int64_t n, L, V;
  DrawMode mode;
  const int64_t* current;
  const float* rate_scale;
  const float* h;
  at::PhiloxCudaState philox;
  int64_t* out;
};

// Stay or jump (kJump), or the winner (kSample), one row per thread.
__global__ void head_finish_kernel(const FinishParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.n) return;
  const HeadRow& state = p.state[r];
  if (p.mode == DrawMode::kSample) {
    p.out[r] = state.result(false, kInvalidToken, 0.0f, 0.0f, 0.0);
    return;
  }
  const int64_t z = __ldg(p.current + r);
  if (z < 0 || z >= p.V) {
    p.out[r] = kInvalidToken;
    return;
  }
  const auto seeds = at::cuda::philox::unpack(p.philox);
  const double u = row_uniforms(std::get<0>(seeds), std::get<1>(seeds), static_cast<uint64_t>(r)).jump;
  const int64_t b = r / p.L;
  p.out[r] = state.result(true, z, __ldg(p.rate_scale + b), __ldg(p.h + b), u);
}

at::Tensor head_rows(const HeadArgs& a, double barrier, double temperature,
                     const std::optional<at::Generator>& generator) {
  const int64_t N = a.rows.rows(), V = a.rows.V;
  at::Tensor out = at::empty({a.rows.B, a.rows.L}, a.hidden.options().dtype(at::kLong));
  if (N == 0) return out;
  check_grid(a.rows);
  // The products are the kernel's internals, below autograd whatever the caller's grad mode.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t tiles = (V + kTile - 1) / kTile;

  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(a.hidden.device().index()));
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(head_words(static_cast<uint64_t>(tiles)));
  }

  at::Tensor state_bytes = at::empty({N * static_cast<int64_t>(sizeof(HeadRow))},
                                     a.hidden.options().dtype(at::kByte));
  HeadRow* state = reinterpret_cast<HeadRow*>(state_bytes.mutable_data_ptr());
  at::Tensor row_max = at::empty({N}, a.hidden.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kInitThreads = 256;
  const auto grid_of = [](int64_t n) { return static_cast<unsigned>((n + kInitThreads - 1) / kInitThreads); };
  head_init_kernel<<<grid_of(N), kInitThreads, 0, stream>>>(state, row_max.mutable_data_ptr<float>(), N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto b = static_cast<float>(barrier);
  const bool finite_barrier = b < INFINITY;
  const int64_t chunk = std::max<int64_t>(1, kBufferBytes / (kTile * a.hidden.element_size()));
  at::Tensor buffer = at::empty({std::min(chunk, N) * std::min(kTile, V)}, a.hidden.options());

  TileParams p;
  p.mode = a.mode;
  p.current = a.current ? a.current->const_data_ptr<int64_t>() : nullptr;
  p.exclude_token = a.exclude_token;
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.barrier = b;
  p.philox = philox;
  p.state = state;
  dispatch_float(a.hidden.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
      const int64_t n = std::min(chunk, N - r0);
      const at::Tensor rows = a.hidden.narrow(0, r0, n);
      p.row0 = r0;
      for (int pass = finite_barrier ? 0 : 1; pass < 2; ++pass) {
        p.row_max = pass == 1 && finite_barrier ? row_max.const_data_ptr<float>() : nullptr;
        for (int64_t k = 0; k < tiles; ++k) {
          const int64_t first = k * kTile, cols = std::min(kTile, V - first);
          at::Tensor tile = buffer.narrow(0, 0, n * cols).view({n, cols});
          const at::Tensor w = a.weight.narrow(0, first, cols).t();
          if (a.bias) {
            at::addmm_out(tile, a.bias->narrow(0, first, cols), rows, w);
          } else {
            at::mm_out(tile, rows, w);
          }
          p.tile = tile.const_data_ptr();
          p.cols = static_cast<int>(cols);
          p.first = first;
          p.tile_index = k;
          if (pass == 0) {
            head_max_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
                p, row_max.mutable_data_ptr<float>());
          } else {
            head_tile_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(p);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    }
  });

  FinishParams f;
  f.state = state;
  f.n = N;
  f.L = a.rows.L;
  f.V = V;
  f.mode = a.mode;
  f.current = p.current;
  f.rate_scale = a.rate_scale ? a.rate_scale->const_data_ptr<float>() : nullptr;
  f.h = a.h ? a.h->const_data_ptr<float>() : nullptr;
  f.philox = philox;
  f.out = out.mutable_data_ptr<int64_t>();
  head_finish_kernel<<<grid_of(N), kInitThreads, 0, stream>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor head_jump_step_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& x_t,
                               const at::Tensor& rate_scale, const at::Tensor& h, double barrier,
                               double temperature, std::optional<at::Generator> generator) {
  check_cuda(hidden, "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  return head_rows(head_jump_args(hidden, weight, bias, x_t, rate_scale, h, barrier, temperature),
                   barrier, temperature, generator);
}

at::Tensor head_sample_categorical_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias,
                                        int64_t exclude_token, double barrier, double temperature,
                                        std::optional<at::Generator> generator) {
  check_cuda(hidden, "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  return head_rows(head_sample_args(hidden, weight, bias, exclude_token, barrier, temperature),
                   barrier, temperature, generator);
}

}  // namespace
}  // namespace fsdfm

TORCH_LIBRARY_IMPL(fsdfm, CUDA, m) {
  m.impl("head_jump_step", &fsdfm::head_jump_step_cuda);
  m.impl("head_sample_categorical", &fsdfm::head_sample_categorical_cuda);
}
