// The CUDA backend against the CPU oracle: every op and module on the same inputs, exactly on
// small-integer data and within the dtype's tolerance on random data, with every device output
// poisoned (NaN) before the run; plus determinism, CUDA-graph replay with new routing and
// 64-bit addressing. Skips with the reason when no GPU is present.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "check/host_tensor.hpp"
#include "check/reference_f64.hpp"
#include "cuda/fast_divisor.hpp"
#include "cuda/varlen_k_tiling.hpp"
#include "cuda/kernel_choice.hpp"
#include "device_tensor.hpp"
#include "scattermoe/scattermoe.hpp"

namespace scattermoe {
namespace {

using check::HostPlan;
using check::HostTensor;
using testing::DeviceBuffer;
using testing::DeviceTensor;

const DType kFloatTypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

struct Case {
  std::int64_t tokens = 37;
  int k = 2;
  int experts = 5;
  std::int64_t d_in = 24;
  std::int64_t d_out = 40;
  int skip = -1;            // an expert left empty
  bool one_expert = false;  // expert 0 takes every token
  std::string name() const {
    return "T" + std::to_string(tokens) + "k" + std::to_string(k) + "E" + std::to_string(experts) +
           "d" + std::to_string(d_in) + "x" + std::to_string(d_out) + (skip >= 0 ? "-empty" : "") +
           (one_expert ? "-one" : "");
  }
};

// The awkward shapes: T = 1, k = 1, 3 and 4 (3: gathered rows divide by a non-power of two),
// sizes that are not multiples of 8 (d_out = 44 with d_in = 32: the wgmma kernels with a tile
// whose last 16-byte chunk is partial), an empty expert, one expert taking every token, more
// rows than a tile, T = 0.
std::vector<Case> cases() {
  return {
      {37, 2, 5, 24, 40, -1, false},  {1, 1, 3, 16, 8, -1, false},    {50, 4, 6, 13, 7, 2, false},
      {64, 1, 4, 32, 48, -1, true},   {300, 2, 8, 72, 136, 3, false}, {0, 2, 4, 16, 16, -1, false},
      {129, 4, 16, 40, 24, -1, true}, {200, 3, 7, 48, 64, -1, false}, {100, 2, 4, 32, 44, -1, false},
  };
}

std::vector<std::int64_t> route(const Case& c, std::mt19937_64& rng) {
  std::vector<std::int64_t> idx = check::draw_routing(rng, c.tokens, c.k, c.experts, c.skip);
  if (c.one_expert) {
    for (std::int64_t t = 0; t < c.tokens; ++t) {
      // put expert 0 first among this token's picks, keeping them distinct
      for (int j = 0; j < c.k; ++j) {
        if (idx[t * c.k + j] == 0) std::swap(idx[t * c.k + j], idx[t * c.k]);
      }
      if (idx[t * c.k] != 0) idx[t * c.k] = 0;
    }
  }
  return idx;
}

void fill(const HostTensor& t, bool ints, std::mt19937_64& rng) {
  if (ints)
    check::fill_ints(t.view(), rng, -2, 2);
  else
    check::fill_normal(t.view(), rng, 0.5);
}

// Routing plan on both devices from the same ids.
struct Plans {
  HostPlan host;
  HostTensor host_ids;
  DeviceTensor dev_ids, dev_sorted_expert, dev_sorted_scattered, dev_offsets;
  RoutingPlan dev;
  DeviceBuffer dev_ws;

  Plans(const std::vector<std::int64_t>& idx, std::int64_t tokens, int k, int experts,
        DType id_dtype = DType::kInt64)
      : host(tokens * k, experts), host_ids(check::make_expert_idxs(idx, tokens, k, id_dtype)) {
    const std::size_t ws = routing_plan_workspace_size(tokens, k, experts, Device::cpu());
    check::Scratch scratch(ws);
    build_routing_plan(host_ids.view(), experts, host.plan(), scratch.context());
    dev_ids = DeviceTensor(host_ids);
    dev_sorted_expert = DeviceTensor(host.sorted_expert_idxs());
    dev_sorted_scattered = DeviceTensor(host.sorted_scattered_idxs());
    dev_offsets = DeviceTensor(host.expert_offsets());
    dev_sorted_expert.poison();
    dev_sorted_scattered.poison();
    dev_offsets.poison();
    dev = RoutingPlan{dev_sorted_expert.view(), dev_sorted_scattered.view(), dev_offsets.view()};
    dev_ws = DeviceBuffer(routing_plan_workspace_size(tokens, k, experts, Device::cuda(0)));
    build_routing_plan(dev_ids.view(), experts, dev,
                       Context{nullptr, {dev_ws.data(), dev_ws.bytes()}});
  }
};

// A host tensor and its device mirror; `out` ones are poisoned on both sides.
struct Pair {
  HostTensor host;
  DeviceTensor dev;
  Pair() = default;
  Pair(DType dtype, std::vector<std::int64_t> shape, bool transposed = false)
      : host(dtype, std::move(shape), transposed), dev(host) {}
  void fill_and_upload(bool ints, std::mt19937_64& rng) {
    fill(host, ints, rng);
    dev.upload(host);
  }
  void poison() {
    host.poison();
    dev.poison();
  }
};

// Compares the device result with the CPU oracle's: bitwise-equal values for integer inputs,
// the dtype's tolerance for random ones; NaN (an unwritten element) never passes.
void expect_match(const Pair& p, bool exact, DType dtype, const std::string& what,
                  double tolerance_scale = 1.0) {
  HostTensor got = p.host;  // same shape and layout
  p.dev.download(got);
  const TensorView want_v = p.host.view();
  const TensorView got_v = got.view();
  if (want_v.rank() == 3) {
    const auto want = check::to_matrices(want_v);
    const auto have = check::to_matrices(got_v);
    const double err = check::relative_error(have, want);
    EXPECT_LE(err, exact ? 0.0 : check::tolerance_for(dtype)) << what;
  } else {
    const check::Matrix want = check::to_matrix(want_v);
    const check::Matrix have = check::to_matrix(got_v);
    for (std::size_t i = 0; i < have.v.size(); ++i) {
      ASSERT_FALSE(std::isnan(have.v[i])) << what << ": element " << i << " was not written";
    }
    if (exact) {
      for (std::size_t i = 0; i < have.v.size(); ++i) {
        ASSERT_EQ(have.v[i], want.v[i]) << what << ": element " << i;
      }
    } else {
      EXPECT_LE(check::relative_error(have, want), tolerance_scale * check::tolerance_for(dtype)) << what;
    }
  }
}

Context device_context(DeviceBuffer& ws) {
  return Context{nullptr, Workspace{ws.data(), ws.bytes()}};
}

// The varlen-K copies divide every gathered row by k with FastDivisor (the same code runs on
// the host): exact against integer division for divisors 1-299 and large ones, each at the
// range's edges, around multiples of the divisor and on random values below 2^31. No GPU needed.
TEST(CudaFastDivisor, MatchesIntegerDivision) {
  std::vector<std::int64_t> divisors;
  for (std::int64_t d = 1; d < 300; ++d) divisors.push_back(d);
  for (std::int64_t d : {65536LL, 65537LL, 1000003LL, (1LL << 30), (1LL << 30) + 1, 3LL << 28, (1LL << 31) - 1}) {
    divisors.push_back(d);
  }
  std::mt19937_64 rng(7);
  for (const std::int64_t d : divisors) {
    const cuda::FastDivisor divide(d);
    auto expect_exact = [&](std::uint32_t r) {
      ASSERT_EQ(divide(r), static_cast<std::uint32_t>(r / static_cast<std::uint64_t>(d))) << r << " / " << d;
    };
    for (std::uint32_t r = 0; r < 2000; ++r) expect_exact(r);
    for (std::uint32_t r = (1u << 31) - 2000; r < (1u << 31); ++r) expect_exact(r);
    for (std::int64_t q = 1; q * d < (1LL << 31); q = 3 * q + 1) {
      expect_exact(static_cast<std::uint32_t>(q * d));
      expect_exact(static_cast<std::uint32_t>(q * d - 1));
    }
    for (int i = 0; i < 2000; ++i) expect_exact(static_cast<std::uint32_t>(rng() % (1u << 31)));
  }
}

// The persistent varlen-K kernel's tile walk (cuda/varlen_k_tiling.hpp) against the plain
// divisions it replaces: every tile of 3 experts for m and n tile counts 1-20 (groups of 8 m
// tiles, full and short) and deepseek's 56 x 16, then tiles near 2^31. No GPU needed.
TEST(CudaVarlenKTiling, MatchesPlainRaster) {
  auto expect_walk = [](int m_tiles, int n_tiles, int linear) {
    const cuda::VarlenKTiling tiling(m_tiles, n_tiles);
    const int per_expert = m_tiles * n_tiles;
    const int group = 8 * n_tiles;
    const int in_expert = linear % per_expert;
    const int first = in_expert / group * 8;
    const int rows_here = std::min(m_tiles - first, 8);
    const int in_group = in_expert % group;
    const cuda::VarlenKTiling::Tile t = tiling(linear);
    ASSERT_EQ(t.e, linear / per_expert) << m_tiles << " x " << n_tiles << " tile " << linear;
    ASSERT_EQ(t.m_tile, first + in_group % rows_here) << m_tiles << " x " << n_tiles << " tile " << linear;
    ASSERT_EQ(t.n_tile, in_group / rows_here) << m_tiles << " x " << n_tiles << " tile " << linear;
  };
  std::vector<std::pair<int, int>> shapes{{56, 16}, {16, 56}, {112, 8}};
  for (int m = 1; m <= 20; ++m) {
    for (int n = 1; n <= 20; ++n) shapes.emplace_back(m, n);
  }
  for (const auto& [m, n] : shapes) {
    for (int linear = 0; linear < 3 * m * n; ++linear) expect_walk(m, n, linear);
  }
  for (const auto& [m, n] : {std::pair{56, 16}, std::pair{13, 7}, std::pair{1, 1}}) {
    const int top = std::numeric_limits<int>::max();
    for (int linear = top - 3000; linear < top; ++linear) expect_walk(m, n, linear);
  }
}

// The persistent varlen-M kernel stores by TMA only what a tensor map can describe: C (and the
// SwiGLU's A) in the grouped order, with 16-byte aligned rows no shorter than the columns.
TEST(CudaKernelChoice, TmaStoresOnlyWhereDescribable) {
  using cuda::VarlenMOutput;
  alignas(16) static unsigned char storage[256];
  auto possible = [](bool grouped, std::int64_t rows, VarlenMOutput c, bool glu, VarlenMOutput a) {
    return cuda::varlen_m_tma_stores_possible(grouped, rows, 64, c, glu, a, 2);
  };
  const VarlenMOutput c{storage, 64};
  EXPECT_TRUE(possible(true, 1000, c, false, {}));
  EXPECT_FALSE(possible(false, 1000, c, false, {}));  // rows scattered: a box of consecutive rows cannot
  EXPECT_FALSE(possible(true, 1000, {storage, 68}, false, {}));     // 136-byte rows: not a multiple of 16
  EXPECT_FALSE(possible(true, 1000, {storage + 8, 64}, false, {}));  // misaligned base
  EXPECT_FALSE(possible(true, 1000, {nullptr, 64}, false, {}));
  EXPECT_FALSE(possible(true, std::int64_t{1} << 31, c, false, {}));  // beyond the kernel's int coordinates
  // The SwiGLU's A must be describable too.
  EXPECT_FALSE(possible(true, 1000, c, true, {}));
  EXPECT_TRUE(possible(true, 1000, c, true, {storage + 128, 32}));
  EXPECT_FALSE(possible(true, 1000, c, true, {storage + 128, 36}));
  // Rows shorter than the columns (overlapping rows) are not a tensor map's.
  EXPECT_FALSE(possible(true, 1000, {storage, 56}, false, {}));
  EXPECT_FALSE(possible(true, 1000, {storage, 0}, false, {}));
  EXPECT_FALSE(possible(true, 1000, c, true, {storage + 128, 24}));
}

// The dispatcher's choices (cuda/kernel_choice.hpp), no GPU needed: by default the measured
// fastest kernel for each GEMM kind, the mma.sync kernels wherever wgmma cannot run, and each
// measurement setting switching what its name says.
TEST(CudaKernelChoice, DefaultsFallbacksAndSettings) {
  using cuda::KernelSettings;
  using cuda::VarlenKContiguous;
  using cuda::VarlenKKernel;
  using cuda::VarlenMKernel;
  const KernelSettings defaults;

  cuda::VarlenMFacts m;
  EXPECT_EQ(cuda::choose_varlen_m_kernel(m, defaults), VarlenMKernel::kSm80);  // no wgmma
  m.wgmma = true;
  m.weight_tma_possible = true;
  for (bool k_major : {false, true}) {
    m.b_k_major = k_major;
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, defaults), VarlenMKernel::kSm90WsGather);  // gathered A
    KernelSettings no_ws_gather;
    no_ws_gather.gather_ws = false;
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, no_ws_gather), VarlenMKernel::kSm90Tma);
    KernelSettings ws_persistent;
    ws_persistent.ws_persistent = 1;
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, ws_persistent), VarlenMKernel::kSm90WsPersistentGather);
    m.rows_per_expert = cuda::kPersistentRowsPerExpert;  // 4 row tiles per expert: persistent
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, defaults), VarlenMKernel::kSm90WsPersistentGather);
    KernelSettings never_persistent;
    never_persistent.ws_persistent = 0;
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, never_persistent), VarlenMKernel::kSm90WsGather);
    m.rows_tma_possible = true;
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, defaults), VarlenMKernel::kSm90WsPersistentTmaRows);
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, never_persistent), VarlenMKernel::kSm90WsTmaRows);
    m.rows_per_expert = cuda::kPersistentRowsPerExpert - 1;  // deepseek-v3's 256: one tile per block
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, defaults), VarlenMKernel::kSm90WsTmaRows);
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, ws_persistent), VarlenMKernel::kSm90WsPersistentTmaRows);
    m.rows_per_expert = 0;
    m.rows_tma_possible = true;  // A read in the grouped order: its rows by TMA too, warp-specialised
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, defaults), VarlenMKernel::kSm90WsTmaRows);
    KernelSettings no_ws;
    no_ws.rows_tma_ws = false;
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, no_ws), VarlenMKernel::kSm90TmaRows);
    KernelSettings no_rows_tma;
    no_rows_tma.rows_tma = false;
    no_rows_tma.gather_ws = false;
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, no_rows_tma), VarlenMKernel::kSm90Tma);
    KernelSettings persistent_tma;
    persistent_tma.persistent_tma = true;
    EXPECT_EQ(cuda::choose_varlen_m_kernel(m, persistent_tma), VarlenMKernel::kSm90PersistentTma);
    m.rows_tma_possible = false;
  }
  KernelSettings no_tma;
  no_tma.weight_tma = false;
  m.b_k_major = true;
  EXPECT_EQ(cuda::choose_varlen_m_kernel(m, no_tma), VarlenMKernel::kSm90);
  m.b_k_major = false;
  EXPECT_EQ(cuda::choose_varlen_m_kernel(m, no_tma), VarlenMKernel::kSm90Persistent);
  no_tma.persistent = 0;
  EXPECT_EQ(cuda::choose_varlen_m_kernel(m, no_tma), VarlenMKernel::kSm90);
  m.b_k_major = true;
  no_tma.persistent = 1;
  EXPECT_EQ(cuda::choose_varlen_m_kernel(m, no_tma), VarlenMKernel::kSm90Persistent);
  m.weight_tma_possible = false;  // e.g. a broadcast weight (expert stride 0)
  EXPECT_EQ(cuda::choose_varlen_m_kernel(m, defaults), VarlenMKernel::kSm90);

  // The SwiGLU epilogue: the persistent gathering kernel only, where the shape allows it.
  EXPECT_TRUE(cuda::fuse_glu_epilogue(VarlenMKernel::kSm90WsPersistentGather, true, defaults));
  EXPECT_FALSE(cuda::fuse_glu_epilogue(VarlenMKernel::kSm90WsPersistentGather, false, defaults));
  EXPECT_FALSE(cuda::fuse_glu_epilogue(VarlenMKernel::kSm90WsGather, true, defaults));
  EXPECT_FALSE(cuda::fuse_glu_epilogue(VarlenMKernel::kSm80, true, defaults));
  KernelSettings glu_after;
  glu_after.glu_epilogue = false;
  EXPECT_FALSE(cuda::fuse_glu_epilogue(VarlenMKernel::kSm90WsPersistentGather, true, glu_after));
  EXPECT_TRUE(cuda::glu_epilogue_shape(2 * 384, true, true));
  EXPECT_TRUE(cuda::glu_epilogue_shape(2 * 128, true, true));
  EXPECT_FALSE(cuda::glu_epilogue_shape(2 * 320, true, true));   // a tile would straddle the halves
  EXPECT_FALSE(cuda::glu_epilogue_shape(2 * 384, false, true));  // C scattered, not H in grouped order
  EXPECT_FALSE(cuda::glu_epilogue_shape(2 * 384, true, false));  // N-major weights

  // The MLP backward's SwiGLU row pass in the dA' GEMM's epilogue: the same kernel, whole
  // 256-column tiles of C, no bias, C grouped, N-major weights (nn.Linear's W2 read along h),
  // 16-byte aligned rows.
  EXPECT_TRUE(cuda::fuse_glu_backward_epilogue(VarlenMKernel::kSm90WsPersistentGather, true, defaults));
  EXPECT_FALSE(cuda::fuse_glu_backward_epilogue(VarlenMKernel::kSm90WsPersistentGather, false, defaults));
  EXPECT_FALSE(cuda::fuse_glu_backward_epilogue(VarlenMKernel::kSm90WsGather, true, defaults));
  KernelSettings rows_after;
  rows_after.glu_backward_epilogue = false;
  EXPECT_FALSE(cuda::fuse_glu_backward_epilogue(VarlenMKernel::kSm90WsPersistentGather, true, rows_after));
  EXPECT_TRUE(cuda::glu_backward_epilogue_shape(768, true, false, false, true));
  EXPECT_FALSE(cuda::glu_backward_epilogue_shape(384, true, false, false, true));  // half a tile
  EXPECT_FALSE(cuda::glu_backward_epilogue_shape(768, false, false, false, true));
  EXPECT_FALSE(cuda::glu_backward_epilogue_shape(768, true, true, false, true));   // a bias
  EXPECT_FALSE(cuda::glu_backward_epilogue_shape(768, true, false, true, true));   // K-major weights
  EXPECT_FALSE(cuda::glu_backward_epilogue_shape(768, true, false, false, false));  // unaligned rows

  cuda::VarlenKFacts k;
  EXPECT_EQ(cuda::choose_varlen_k_kernel(k, defaults).kernel, VarlenKKernel::kSm80);
  k.wgmma = true;
  k.store_tma_possible = true;
  k.a_contiguous = true;  // dW2: g * A grouped, dY gathered
  cuda::VarlenKChoice c = cuda::choose_varlen_k_kernel(k, defaults);
  EXPECT_EQ(c.kernel, VarlenKKernel::kSm90Persistent);
  EXPECT_EQ(c.contiguous, VarlenKContiguous::kA);
  EXPECT_TRUE(c.tma_store);
  EXPECT_TRUE(c.warp_specialised);
  EXPECT_TRUE(c.warp_stores);
  KernelSettings block_stores;
  block_stores.varlen_k_warp_stores = false;
  EXPECT_FALSE(cuda::choose_varlen_k_kernel(k, block_stores).warp_stores);
  KernelSettings no_ws;
  no_ws.varlen_k_ws = false;
  c = cuda::choose_varlen_k_kernel(k, no_ws);
  EXPECT_TRUE(c.tma_store);
  EXPECT_FALSE(c.warp_specialised);
  k.b_contiguous = true;  // group_xty: both grouped; B is the wider tile
  EXPECT_EQ(cuda::choose_varlen_k_kernel(k, defaults).contiguous, VarlenKContiguous::kB);
  k.a_contiguous = false;  // dW1: X gathered, dH grouped
  EXPECT_EQ(cuda::choose_varlen_k_kernel(k, defaults).contiguous, VarlenKContiguous::kB);
  k.b_contiguous = false;
  EXPECT_EQ(cuda::choose_varlen_k_kernel(k, defaults).contiguous, VarlenKContiguous::kNeither);
  KernelSettings thread_stores;
  thread_stores.varlen_k_tma_store = false;
  EXPECT_FALSE(cuda::choose_varlen_k_kernel(k, thread_stores).tma_store);
  EXPECT_FALSE(cuda::choose_varlen_k_kernel(k, thread_stores).warp_specialised);  // it stores by TMA
  k.store_tma_possible = false;  // e.g. an output row stride that is not a multiple of 16 bytes
  EXPECT_FALSE(cuda::choose_varlen_k_kernel(k, defaults).tma_store);
  EXPECT_FALSE(cuda::choose_varlen_k_kernel(k, defaults).warp_specialised);
  KernelSettings not_persistent;
  not_persistent.persistent = 0;
  EXPECT_EQ(cuda::choose_varlen_k_kernel(k, not_persistent).kernel, VarlenKKernel::kSm90);
}

TEST(CudaPlan, MatchesCpuBitwise) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(7);
  for (const Case& c : cases()) {
    for (DType id_dtype : {DType::kInt32, DType::kInt64}) {
      const auto idx = route(c, rng);
      Plans plans(idx, c.tokens, c.k, c.experts, id_dtype);
      SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
      HostTensor got_se = plans.host.sorted_expert_idxs();
      HostTensor got_ss = plans.host.sorted_scattered_idxs();
      HostTensor got_off = plans.host.expert_offsets();
      plans.dev_sorted_expert.download(got_se);
      plans.dev_sorted_scattered.download(got_ss);
      plans.dev_offsets.download(got_off);
      EXPECT_TRUE(got_se.same_bytes(plans.host.sorted_expert_idxs())) << c.name();
      EXPECT_TRUE(got_ss.same_bytes(plans.host.sorted_scattered_idxs())) << c.name();
      EXPECT_TRUE(got_off.same_bytes(plans.host.expert_offsets())) << c.name();
    }
  }
}

TEST(CudaScatter2Scatter, AllModesMatchCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(11);
  for (const Case& c : cases()) {
    const auto idx = route(c, rng);
    Plans plans(idx, c.tokens, c.k, c.experts);
    const std::int64_t L = c.tokens * c.k;
    for (DType dtype : kFloatTypes) {
      for (bool ints : {true, false}) {
        for (int mode = 0; mode < 4; ++mode) {
          const bool xg = mode & 1, yg = mode & 2;
          const bool bias_on = mode != 1, transposed = mode >= 2;
          Pair x(dtype, {xg ? L : c.tokens, c.d_in});
          Pair w(dtype, {c.experts, c.d_in, c.d_out}, transposed);
          Pair b(dtype, {c.experts, c.d_out});
          Pair y(dtype, {L, c.d_out});
          x.fill_and_upload(ints, rng);
          w.fill_and_upload(ints, rng);
          b.fill_and_upload(ints, rng);
          y.poison();
          Scatter2ScatterArgs host_args{
              x.host.view(), w.host.view(), bias_on ? b.host.view() : TensorView{}, c.k, xg, yg};
          scatter2scatter(host_args, plans.host.plan(), y.host.view());
          Scatter2ScatterArgs dev_args{
              x.dev.view(), w.dev.view(), bias_on ? b.dev.view() : TensorView{}, c.k, xg, yg};
          DeviceBuffer ws(scatter2scatter_workspace_size(dev_args, plans.dev));
          scatter2scatter(dev_args, plans.dev, y.dev.view(), device_context(ws));
          SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
          expect_match(y, ints, dtype,
                       "scatter2scatter " + c.name() + " " + dtype_name(dtype) + " mode " +
                           std::to_string(mode) + (ints ? " exact" : " random"));
        }
      }
    }
  }
}

// Grouped input rows (read in the grouped order, so on sm_90a they come by TMA with the weights,
// warp-specialised) over many k tiles: K = 1000 is 16 k tiles, the last partial, so the stage
// ring wraps four times; experts of ~150 rows end inside row tiles (a tile's rows past its expert
// are the next expert's, or past the last row), one is empty, and one expert takes every token.
TEST(CudaScatter2Scatter, GroupedRowsOverManyKTilesMatchCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(23);
  for (const Case& c : {Case{700, 2, 9, 1000, 136, 4, false}, Case{130, 4, 12, 520, 264, -1, true}}) {
    const auto idx = route(c, rng);
    Plans plans(idx, c.tokens, c.k, c.experts);
    const std::int64_t L = c.tokens * c.k;
    for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
      for (bool ints : {true, false}) {
        for (bool transposed : {false, true}) {
          for (bool yg : {false, true}) {
            Pair x(dtype, {L, c.d_in});
            Pair w(dtype, {c.experts, c.d_in, c.d_out}, transposed);
            Pair y(dtype, {L, c.d_out});
            x.fill_and_upload(ints, rng);
            w.fill_and_upload(ints, rng);
            y.poison();
            scatter2scatter({x.host.view(), w.host.view(), TensorView{}, c.k, true, yg}, plans.host.plan(),
                            y.host.view());
            Scatter2ScatterArgs dev_args{x.dev.view(), w.dev.view(), TensorView{}, c.k, true, yg};
            DeviceBuffer ws(scatter2scatter_workspace_size(dev_args, plans.dev));
            scatter2scatter(dev_args, plans.dev, y.dev.view(), device_context(ws));
            SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
            expect_match(y, ints, dtype,
                         "scatter2scatter grouped in " + c.name() + " " + dtype_name(dtype) +
                             (transposed ? " N-major" : " K-major") + (yg ? " grouped out" : " scattered out") +
                             (ints ? " exact" : " random"));
          }
        }
      }
    }
  }
}

TEST(CudaGroup, MatchesCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(12);
  for (const Case& c : cases()) {
    const auto idx = route(c, rng);
    Plans plans(idx, c.tokens, c.k, c.experts);
    const std::int64_t L = c.tokens * c.k;
    for (DType dtype : kFloatTypes) {
      for (bool with_coeff : {false, true}) {
        Pair a(dtype, {c.tokens, c.d_in});
        Pair coeff(DType::kFloat32, {c.tokens, c.k});
        Pair g(dtype, {L, c.d_in});
        a.fill_and_upload(true, rng);
        coeff.fill_and_upload(true, rng);
        g.poison();
        group(a.host.view(), plans.host.plan(), c.k, with_coeff ? coeff.host.view() : TensorView{},
              g.host.view());
        group(a.dev.view(), plans.dev, c.k, with_coeff ? coeff.dev.view() : TensorView{},
              g.dev.view());
        SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
        expect_match(g, true, dtype, "group " + c.name());
      }
    }
  }
}

TEST(CudaGroupXty, MatchesCpuInBothWeightLayouts) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(13);
  for (const Case& c : cases()) {
    const auto idx = route(c, rng);
    Plans plans(idx, c.tokens, c.k, c.experts);
    const std::int64_t L = c.tokens * c.k;
    for (DType dtype : kFloatTypes) {
      for (bool ints : {true, false}) {
        for (bool transposed : {false, true}) {
          Pair dy(dtype, {L, c.d_out});
          Pair x(dtype, {L, c.d_in});
          Pair dw(dtype, {c.experts, c.d_in, c.d_out}, transposed);
          Pair db(dtype, {c.experts, c.d_out});
          dy.fill_and_upload(ints, rng);
          x.fill_and_upload(ints, rng);
          dw.poison();
          db.poison();
          group_xty(dy.host.view(), x.host.view(), plans.host.plan(), dw.host.view(),
                    db.host.view());
          group_xty(dy.dev.view(), x.dev.view(), plans.dev, dw.dev.view(), db.dev.view());
          SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
          const std::string what =
              "group_xty " + c.name() + " " + dtype_name(dtype) + (transposed ? " transposed" : "");
          expect_match(dw, ints, dtype, what + " dw");
          expect_match(db, ints, dtype, what + " db");
        }
      }
    }
  }
}

// More dW tiles than a GPU has SMs, so every block of the persistent weight-gradient kernel
// computes several tiles as one pipeline: the next tile's copies are in flight while a tile is
// stored, and the staging stages are refilled right after their TMA store has read them.
// 64 experts x 2 x 2 tiles of 128 x 256 = 256 tiles of 2-4 k tiles; then 64 x 4 x 2 = 512 tiles
// of 1 k tile (about 19 rows per expert), 3-4 per block on 132 SMs, so a tile finishes at every
// iteration. The last expert is empty in both, so its tiles of no k tile come after a block's
// stored tiles (tile numbers above the SM count) and restage the stages still being stored.
TEST(CudaGroupXty, MoreTilesThanSmsMatchCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(29);
  for (const Case& c : {Case{2080, 4, 64, 256, 512, 63, false}, Case{600, 2, 64, 512, 512, 63, false}}) {
    Plans plans(route(c, rng), c.tokens, c.k, c.experts);
    const std::int64_t L = c.tokens * c.k;
    for (bool ints : {true, false}) {
      for (bool transposed : {false, true}) {
        Pair dy(DType::kBFloat16, {L, c.d_out});
        Pair x(DType::kBFloat16, {L, c.d_in});
        Pair dw(DType::kBFloat16, {c.experts, c.d_in, c.d_out}, transposed);
        dy.fill_and_upload(ints, rng);
        x.fill_and_upload(ints, rng);
        dw.poison();
        group_xty(dy.host.view(), x.host.view(), plans.host.plan(), dw.host.view(), TensorView());
        group_xty(dy.dev.view(), x.dev.view(), plans.dev, dw.dev.view(), TensorView());
        SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
        expect_match(dw, ints, DType::kBFloat16,
                     "group_xty " + c.name() + (ints ? " ints" : " random") + (transposed ? " transposed" : ""));
      }
    }
  }
}

// An expert's weight gradient depends on its own rows alone: when the next expert's rows hold
// inf (a diverged gradient), every other expert's dW stays finite and matches the oracle's. A
// kernel that reads a whole 64-row tile past an expert's end must keep those rows out, even as
// 0 * inf.
TEST(CudaGroupXty, NonFiniteRowsOfOneExpertStayInIt) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(23);
  const Case c{300, 2, 4, 72, 136, -1, false};
  Plans plans(route(c, rng), c.tokens, c.k, c.experts);
  const std::int64_t L = c.tokens * c.k;
  const auto* offsets = static_cast<const std::int64_t*>(plans.host.plan().expert_offsets.data());
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    for (bool transposed : {false, true}) {
      Pair dy(dtype, {L, c.d_out});
      Pair x(dtype, {L, c.d_in});
      Pair dw(dtype, {c.experts, c.d_in, c.d_out}, transposed);
      fill(dy.host, false, rng);
      fill(x.host, false, rng);
      for (std::int64_t i = offsets[0]; i < offsets[1]; ++i) {  // expert 1's rows
        const std::int64_t first[2] = {i, 0};
        check::write_element(dy.host.view(), first, std::numeric_limits<double>::infinity());
        check::write_element(x.host.view(), first, std::numeric_limits<double>::infinity());
      }
      dy.dev.upload(dy.host);
      x.dev.upload(x.host);
      dw.poison();
      group_xty(dy.host.view(), x.host.view(), plans.host.plan(), dw.host.view(), TensorView{});
      group_xty(dy.dev.view(), x.dev.view(), plans.dev, dw.dev.view(), TensorView{});
      SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
      HostTensor got = dw.host;
      dw.dev.download(got);
      const auto want = check::to_matrices(dw.host.view());
      const auto have = check::to_matrices(got.view());
      const std::string what = std::string("group_xty with inf rows in expert 1, ") + dtype_name(dtype) +
                               (transposed ? " transposed" : "");
      for (int e = 0; e < c.experts; ++e) {
        if (e == 1) continue;
        const auto ue = static_cast<std::size_t>(e);
        for (double v : have[ue].v) ASSERT_TRUE(std::isfinite(v)) << what << ", expert " << e;
        EXPECT_LE(check::relative_error(have[ue], want[ue]), check::tolerance_for(dtype)) << what << ", expert " << e;
      }
    }
  }
}

TEST(CudaParallelLinear, ForwardBackwardMatchCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(14);
  for (const Case& c : cases()) {
    const auto idx = route(c, rng);
    Plans plans(idx, c.tokens, c.k, c.experts);
    const std::int64_t L = c.tokens * c.k;
    for (DType dtype : kFloatTypes) {
      for (bool ints : {true, false}) {
        for (int mode = 0; mode < 5;
             ++mode) {  // 0-3: the four modes; 4: scattered in/out with gates
          const bool gin = mode == 1 || mode == 3, gout = mode == 2 || mode == 3, gated = mode == 4;
          const bool bias_on = mode % 2 == 0;
          Pair x(dtype, {gin ? L : c.tokens, c.d_in});
          Pair w(dtype, {c.experts, c.d_in, c.d_out}, /*transposed=*/mode >= 2);
          Pair b(dtype, {c.experts, c.d_out});
          Pair gates(DType::kFloat32, {c.tokens, c.k});
          const std::int64_t out_rows = gated ? c.tokens : L;
          Pair out(dtype, {out_rows, c.d_out});
          Pair d_out(dtype, {out_rows, c.d_out});
          Pair dx(dtype, {gin ? L : c.tokens, c.d_in});
          Pair dw(dtype, {c.experts, c.d_in, c.d_out}, mode >= 2);
          Pair db(dtype, {c.experts, c.d_out});
          Pair dg(DType::kFloat32, {c.tokens, c.k});
          for (Pair* p : {&x, &w, &b, &gates, &d_out}) p->fill_and_upload(ints, rng);
          for (Pair* p : {&out, &dx, &dw, &db, &dg}) p->poison();
          auto args_on = [&](bool dev) {
            auto v = [&](const Pair& p) { return dev ? p.dev.view() : p.host.view(); };
            return ParallelLinearArgs{
                v(x), v(w), bias_on ? v(b) : TensorView{}, gated ? v(gates) : TensorView{}, c.k,
                gin,  gout};
          };
          auto grads_on = [&](bool dev) {
            auto v = [&](const Pair& p) { return dev ? p.dev.view() : p.host.view(); };
            return ParallelLinearGrads{v(dx), v(dw), bias_on ? v(db) : TensorView{},
                                       gated ? v(dg) : TensorView{}};
          };
          {
            check::Scratch f(
                parallel_linear_forward_workspace_size(args_on(false), plans.host.plan()));
            parallel_linear_forward(args_on(false), plans.host.plan(), out.host.view(),
                                    f.context());
            check::Scratch bw(parallel_linear_backward_workspace_size(
                args_on(false), plans.host.plan(), grads_on(false)));
            parallel_linear_backward(args_on(false), plans.host.plan(), d_out.host.view(),
                                     grads_on(false), bw.context());
          }
          DeviceBuffer fws(parallel_linear_forward_workspace_size(args_on(true), plans.dev));
          parallel_linear_forward(args_on(true), plans.dev, out.dev.view(), device_context(fws));
          DeviceBuffer bws(
              parallel_linear_backward_workspace_size(args_on(true), plans.dev, grads_on(true)));
          parallel_linear_backward(args_on(true), plans.dev, d_out.dev.view(), grads_on(true),
                                   device_context(bws));
          SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
          const std::string what = "parallel_linear " + c.name() + " " + dtype_name(dtype) +
                                   " mode " + std::to_string(mode) + (ints ? " exact" : " random");
          // Gated outputs mix in f32 gates: exact only without gates.
          const bool exact = ints && !gated;
          expect_match(out, exact, dtype, what + " out");
          expect_match(dx, exact, dtype, what + " dx");
          expect_match(dw, exact, dtype, what + " dw");
          if (bias_on) expect_match(db, exact, dtype, what + " db");
          if (gated) expect_match(dg, false, dtype, what + " d_gates");
        }
      }
    }
  }
}

struct MlpPairs {
  Pair x, w1, b1, w2, b2, gates, out, hidden, d_out, dx, dw1, db1, dw2, db2, dg;
  // weights_k_major: W1 and W2 stored as nn.Linear stores them, (E, d_out, d_in), and passed
  // as transposed views (unit stride along d_in, the GEMMs' K); else (E, d_in, d_out) as is.
  MlpPairs(const Case& c, DType dtype, bool glu, std::int64_t h, bool weights_k_major = true) {
    const std::int64_t d = c.d_in, L = c.tokens * c.k, h1 = glu ? 2 * h : h;
    x = Pair(dtype, {c.tokens, d});
    w1 = Pair(dtype, {c.experts, d, h1}, weights_k_major);
    b1 = Pair(dtype, {c.experts, h1});
    w2 = Pair(dtype, {c.experts, h, d}, weights_k_major);
    b2 = Pair(dtype, {c.experts, d});
    gates = Pair(DType::kFloat32, {c.tokens, c.k});
    out = Pair(dtype, {c.tokens, d});
    hidden = Pair(dtype, {L, h1});
    d_out = Pair(dtype, {c.tokens, d});
    dx = Pair(dtype, {c.tokens, d});
    dw1 = Pair(dtype, {c.experts, d, h1}, true);
    db1 = Pair(dtype, {c.experts, h1});
    dw2 = Pair(dtype, {c.experts, h, d}, true);
    db2 = Pair(dtype, {c.experts, d});
    dg = Pair(DType::kFloat32, {c.tokens, c.k});
  }
  MlpArgs args(bool dev, Activation act, bool glu, bool bias) const {
    auto v = [&](const Pair& p) { return dev ? p.dev.view() : p.host.view(); };
    return MlpArgs{
        v(x), v(w1), bias ? v(b1) : TensorView{}, v(w2), bias ? v(b2) : TensorView{}, v(gates),
        act,  glu};
  }
  MlpGrads grads(bool dev, bool bias) const {
    auto v = [&](const Pair& p) { return dev ? p.dev.view() : p.host.view(); };
    return MlpGrads{
        v(dx), v(dw1), bias ? v(db1) : TensorView{}, v(dw2), bias ? v(db2) : TensorView{}, v(dg)};
  }
};

// mlp_forward then mlp_backward into grads, each with a workspace of its own size: on the host
// (the oracle; plan is the host plan) or on the device.
void run_mlp_host(const MlpPairs& m, const RoutingPlan& plan, const MlpArgs& args, const MlpGrads& grads) {
  check::Scratch f(mlp_forward_workspace_size(args, plan));
  mlp_forward(args, plan, m.out.host.view(), m.hidden.host.view(), f.context());
  check::Scratch b(mlp_backward_workspace_size(args, plan));
  mlp_backward(args, plan, m.hidden.host.view(), m.d_out.host.view(), grads, b.context());
}

void run_mlp_host(const MlpPairs& m, const RoutingPlan& plan, Activation act, bool glu, bool bias,
                  const MlpGrads& grads) {
  run_mlp_host(m, plan, m.args(false, act, glu, bias), grads);
}

void run_mlp_device(const MlpPairs& m, const RoutingPlan& plan, const MlpArgs& args, const MlpGrads& grads) {
  DeviceBuffer fws(mlp_forward_workspace_size(args, plan));
  mlp_forward(args, plan, m.out.dev.view(), m.hidden.dev.view(), device_context(fws));
  DeviceBuffer bws(mlp_backward_workspace_size(args, plan));
  mlp_backward(args, plan, m.hidden.dev.view(), m.d_out.dev.view(), grads, device_context(bws));
}

void run_mlp_device(const MlpPairs& m, const RoutingPlan& plan, Activation act, bool glu, bool bias,
                    const MlpGrads& grads) {
  run_mlp_device(m, plan, m.args(true, act, glu, bias), grads);
}

void run_mlp_device(const MlpPairs& m, const RoutingPlan& plan, Activation act, bool glu, bool bias) {
  run_mlp_device(m, plan, act, glu, bias, m.grads(true, bias));
}

// Every output of one forward and backward against the oracle's, within the dtype's tolerance.
void expect_mlp_match(const MlpPairs& m, DType dtype, bool bias, const std::string& what) {
  expect_match(m.out, false, dtype, what + " out");
  expect_match(m.hidden, false, dtype, what + " hidden");
  expect_match(m.dx, false, dtype, what + " dx");
  expect_match(m.dw1, false, dtype, what + " dw1");
  expect_match(m.dw2, false, dtype, what + " dw2");
  if (bias) {
    expect_match(m.db1, false, dtype, what + " db1");
    expect_match(m.db2, false, dtype, what + " db2");
  }
  // d_gates is a dot product over h that the GPU takes from dtype-rounded intermediates
  // (dA', A) and the oracle from fp32 ones; cancellation in such a sum amplifies the
  // rounding by up to sum|a_i b_i| / |sum a_i b_i|, about sqrt(h) for random data.
  expect_match(m.dg, false, dtype, what + " d_gates", 4.0);
}

TEST(CudaMlp, ForwardBackwardMatchCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(15);
  for (const Case& c : cases()) {
    const auto idx = route(c, rng);
    Plans plans(idx, c.tokens, c.k, c.experts);
    for (DType dtype : kFloatTypes) {
      for (int variant = 0; variant < 4; ++variant) {
        const bool glu = variant % 2 == 0;
        const bool bias = variant < 2;
        const Activation act = variant == 0   ? Activation::kSilu
                               : variant == 1 ? Activation::kGelu
                               : variant == 2 ? Activation::kGeluTanh
                                              : Activation::kRelu;
        MlpPairs m(c, dtype, glu, c.d_out);
        for (Pair* p : {&m.x, &m.w1, &m.b1, &m.w2, &m.b2, &m.gates, &m.d_out})
          p->fill_and_upload(false, rng);
        for (Pair* p : {&m.out, &m.hidden, &m.dx, &m.dw1, &m.db1, &m.dw2, &m.db2, &m.dg})
          p->poison();
        run_mlp_host(m, plans.host.plan(), act, glu, bias, m.grads(false, bias));
        run_mlp_device(m, plans.dev, act, glu, bias);
        SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
        const std::string what = "mlp " + c.name() + " " + dtype_name(dtype) + " " +
                                 activation_name(act) + (glu ? " glu" : "") + (bias ? " bias" : "");
        expect_mlp_match(m, dtype, bias, what);
      }
    }
  }
}

// The SwiGLU in the up projection's epilogue (sm_90a): h a multiple of 128 (one, two and three
// 256-column tiles of [first | gate]) and at least 512 routed rows per expert, so the default
// path runs the persistent gathering kernel that has it; with an empty expert, one expert taking
// every token, K not a multiple of the k tile, rows not a multiple of the row tile, and more
// tiles than an H200 has SMs (the last case: 256 up-projection tiles, so blocks go on to a second
// tile and reuse the staging, the bias tile and the stages). GELU-GLU at the same shapes, and
// N-major weights, take the activation pass instead.
TEST(CudaMlp, SwigluEpilogueShapesMatchCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(21);
  for (const Case& c : {Case{1100, 2, 4, 64, 256, -1, false}, Case{2600, 1, 5, 72, 384, 2, false},
                        Case{1024, 2, 4, 64, 128, -1, true}, Case{4096, 2, 4, 32, 512, -1, false}}) {
    // The shapes the fused epilogue needs (kernel_choice.hpp): the persistent kernel's rows per
    // expert and h a multiple of 128.
    ASSERT_GE(c.tokens * c.k / c.experts, cuda::kPersistentRowsPerExpert) << c.name();
    ASSERT_TRUE(cuda::glu_epilogue_shape(2 * c.d_out, true, true)) << c.name();
    Plans plans(route(c, rng), c.tokens, c.k, c.experts);
    for (DType dtype : kFloatTypes) {
      for (int variant = 0; variant < 4; ++variant) {
        const bool bias = variant != 1;
        const Activation act = variant == 2 ? Activation::kGelu : Activation::kSilu;
        const bool k_major = variant != 3;
        MlpPairs m(c, dtype, true, c.d_out, k_major);
        for (Pair* p : {&m.x, &m.w1, &m.b1, &m.w2, &m.b2, &m.gates, &m.d_out})
          p->fill_and_upload(false, rng);
        for (Pair* p : {&m.out, &m.hidden, &m.dx, &m.dw1, &m.db1, &m.dw2, &m.db2, &m.dg})
          p->poison();
        run_mlp_host(m, plans.host.plan(), act, true, bias, m.grads(false, bias));
        run_mlp_device(m, plans.dev, act, true, bias);
        SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
        const std::string what = "mlp " + c.name() + " " + dtype_name(dtype) + " " +
                                 activation_name(act) + " glu" + (bias ? " bias" : "") +
                                 (k_major ? "" : " n-major");
        expect_mlp_match(m, dtype, bias, what);
      }
    }
  }
}

// The MLP backward's SwiGLU row pass in the dA' GEMM's epilogue (no b2, h a multiple of 256,
// nn.Linear-stored W2, 512 or more routed rows per expert: the persistent gathering kernel):
// h of one, two and three column tiles (d_gates summed over the tiles' shares), K = 72 (not a
// multiple of the k tile) and an empty expert, and more dA' tiles than an H200 has SMs (the
// last case: 384, so blocks go on to a second tile and the other half of the weights' tile);
// every subset of the gradients (each writes a different subset of dH, g * A and d_gates), b1
// with and without, and W2 stored the other way (K-major: the row pass after the GEMM).
TEST(CudaMlp, SwigluBackwardEpilogueMatchesCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(23);
  // The 16-bit types (the fused path's); every variant on the first shape, on the larger ones
  // (the CPU oracle's time grows with them) all gradients with b1 and without, in bf16 only on
  // the largest.
  const std::vector<int> all_variants = {0, 1, 2, 3, 4, 5};
  const std::vector<int> some_variants = {0, 4};
  const std::vector<DType> bf16_only = {DType::kBFloat16};
  const std::vector<DType> both_16 = {DType::kBFloat16, DType::kFloat16};
  const Case cases_here[] = {Case{1100, 2, 4, 64, 256, -1, false}, Case{2600, 1, 5, 72, 512, 2, false},
                             Case{4096, 4, 4, 32, 768, -1, false}};
  for (int ci = 0; ci < 3; ++ci) {
    const Case& c = cases_here[ci];
    ASSERT_GE(c.tokens * c.k / c.experts, cuda::kPersistentRowsPerExpert) << c.name();
    ASSERT_TRUE(cuda::glu_backward_epilogue_shape(c.d_out, true, false, false, true)) << c.name();
    Plans plans(route(c, rng), c.tokens, c.k, c.experts);
    const std::vector<DType>& dtypes = ci == 2 ? bf16_only : both_16;
    for (DType dtype : dtypes) {
      for (int variant : ci == 0 ? all_variants : some_variants) {
        // 0-3: the gradient subsets of BackwardGradientSubsetsMatchCpu (0: all, 1: dW2 alone, 2:
        // d_gates alone, 3: dX and dW1); 4: all with b1; 5: all, W2 K-major.
        const int subset = variant < 4 ? variant : 0;
        const bool b1 = variant == 4;
        const bool k_major = variant != 5;
        MlpPairs m(c, dtype, true, c.d_out, k_major);
        for (Pair* p : {&m.x, &m.w1, &m.b1, &m.w2, &m.gates, &m.d_out}) p->fill_and_upload(false, rng);
        for (Pair* p : {&m.out, &m.hidden, &m.dx, &m.dw1, &m.db1, &m.dw2, &m.dg}) p->poison();
        const bool want_first = subset == 0 || subset == 3;
        const bool want_dw2 = subset == 0 || subset == 1;
        const bool want_dg = subset == 0 || subset == 2;
        auto grads = [&](bool dev) {
          auto v = [&](const Pair& p, bool want) { return want ? (dev ? p.dev.view() : p.host.view()) : TensorView{}; };
          return MlpGrads{v(m.dx, want_first), v(m.dw1, want_first), v(m.db1, want_first && b1),
                          v(m.dw2, want_dw2),  TensorView{},         v(m.dg, want_dg)};
        };
        auto args = [&](bool dev) {
          MlpArgs a = m.args(dev, Activation::kSilu, true, false);
          if (b1) a.b1 = dev ? m.b1.dev.view() : m.b1.host.view();
          return a;
        };
        run_mlp_host(m, plans.host.plan(), args(false), grads(false));
        run_mlp_device(m, plans.dev, args(true), grads(true));
        SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
        const std::string what = "mlp " + c.name() + " " + dtype_name(dtype) + " subset " +
                                 std::to_string(subset) + (b1 ? " b1" : "") + (k_major ? "" : " w2 k-major");
        expect_match(m.out, false, dtype, what + " out");
        expect_match(m.hidden, false, dtype, what + " hidden");
        if (want_first) {
          expect_match(m.dx, false, dtype, what + " dx");
          expect_match(m.dw1, false, dtype, what + " dw1");
          if (b1) expect_match(m.db1, false, dtype, what + " db1");
        }
        if (want_dw2) expect_match(m.dw2, false, dtype, what + " dw2");
        if (want_dg) expect_match(m.dg, false, dtype, what + " d_gates", 4.0);
      }
    }
  }
}

// With biases but without their gradients, dW2 takes the path that scales A by the gates in
// place and gathers dOut inside the GEMM; asking for dW2 alone takes it with nothing after it.
TEST(CudaMlp, WeightGradientsWithoutBiasGradientsMatchCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(18);
  for (const Case& c : {Case{300, 2, 8, 72, 136, 3, false}, Case{129, 4, 16, 40, 24, -1, true}}) {
    Plans plans(route(c, rng), c.tokens, c.k, c.experts);
    for (DType dtype : kFloatTypes) {
      for (const bool only_dw2 : {false, true}) {
        MlpPairs m(c, dtype, true, c.d_out);
        for (Pair* p : {&m.x, &m.w1, &m.b1, &m.w2, &m.b2, &m.gates, &m.d_out})
          p->fill_and_upload(false, rng);
        for (Pair* p : {&m.out, &m.hidden, &m.dx, &m.dw1, &m.dw2, &m.dg}) p->poison();
        auto grads = [&](bool dev) {
          auto v = [&](const Pair& p) { return dev ? p.dev.view() : p.host.view(); };
          return only_dw2 ? MlpGrads{TensorView{}, TensorView{}, TensorView{}, v(m.dw2), TensorView{},
                                     TensorView{}}
                          : MlpGrads{v(m.dx), v(m.dw1), TensorView{}, v(m.dw2), TensorView{}, v(m.dg)};
        };
        run_mlp_host(m, plans.host.plan(), Activation::kSilu, true, true, grads(false));
        run_mlp_device(m, plans.dev, Activation::kSilu, true, true, grads(true));
        SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
        const std::string what = "mlp " + c.name() + " " + dtype_name(dtype) +
                                 (only_dw2 ? " dw2 only" : " no bias grads");
        expect_match(m.dw2, false, dtype, what + " dw2");
        if (!only_dw2) {
          expect_match(m.dx, false, dtype, what + " dx");
          expect_match(m.dw1, false, dtype, what + " dw1");
          expect_match(m.dg, false, dtype, what + " d_gates", 4.0);
        }
      }
    }
  }
}

// The backward without biases for every subset of the gradients (each skips different steps and
// reuses the scratch regions differently), both layouts of W2, h spanning two 256-column tiles,
// with GLU and without.
TEST(CudaMlp, BackwardGradientSubsetsMatchCpu) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(21);
  const Case c{300, 2, 8, 72, 264, 3, false};
  Plans plans(route(c, rng), c.tokens, c.k, c.experts);
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    for (const bool glu : {true, false}) {
      for (const bool w2_row_major : {false, true}) {
        for (int subset = 0; subset < 4; ++subset) {
          const Activation act = glu ? Activation::kSilu : Activation::kGelu;
          MlpPairs m(c, dtype, glu, c.d_out);
          if (w2_row_major) m.w2 = Pair(dtype, {c.experts, c.d_out, c.d_in});
          for (Pair* p : {&m.x, &m.w1, &m.w2, &m.gates, &m.d_out}) p->fill_and_upload(false, rng);
          for (Pair* p : {&m.out, &m.hidden, &m.dx, &m.dw1, &m.dw2, &m.dg}) p->poison();
          // 0: all, 1: dW2 alone, 2: d_gates alone, 3: dX and dW1.
          const bool want_first = subset == 0 || subset == 3;
          const bool want_dw2 = subset == 0 || subset == 1;
          const bool want_dg = subset == 0 || subset == 2;
          auto grads = [&](bool dev) {
            auto v = [&](const Pair& p, bool want) { return want ? (dev ? p.dev.view() : p.host.view()) : TensorView{}; };
            return MlpGrads{v(m.dx, want_first), v(m.dw1, want_first), TensorView{},
                            v(m.dw2, want_dw2),  TensorView{},          v(m.dg, want_dg)};
          };
          run_mlp_host(m, plans.host.plan(), act, glu, false, grads(false));
          run_mlp_device(m, plans.dev, act, glu, false, grads(true));
          SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
          const std::string what = "mlp " + c.name() + " " + dtype_name(dtype) + (glu ? " glu" : "") +
                                   (w2_row_major ? " w2 row-major" : "") + " subset " + std::to_string(subset);
          if (want_first) {
            expect_match(m.dx, false, dtype, what + " dx");
            expect_match(m.dw1, false, dtype, what + " dw1");
          }
          if (want_dw2) expect_match(m.dw2, false, dtype, what + " dw2");
          if (want_dg) expect_match(m.dg, false, dtype, what + " d_gates", 4.0);
        }
      }
    }
  }
}

TEST(CudaMlp, RerunsAreBitwiseEqual) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(16);
  const Case c{300, 4, 8, 64, 96, -1, false};
  Plans plans(route(c, rng), c.tokens, c.k, c.experts);
  MlpPairs m(c, DType::kBFloat16, true, c.d_out);
  for (Pair* p : {&m.x, &m.w1, &m.b1, &m.w2, &m.b2, &m.gates, &m.d_out})
    p->fill_and_upload(false, rng);
  run_mlp_device(m, plans.dev, Activation::kSilu, true, true);
  SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
  std::vector<HostTensor> first;
  for (Pair* p : {&m.out, &m.hidden, &m.dx, &m.dw1, &m.db1, &m.dw2, &m.db2, &m.dg}) {
    first.push_back(p->host);
    p->dev.download(first.back());
    p->dev.poison();
  }
  run_mlp_device(m, plans.dev, Activation::kSilu, true, true);
  SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
  int i = 0;
  for (Pair* p : {&m.out, &m.hidden, &m.dx, &m.dw1, &m.db1, &m.dw2, &m.db2, &m.dg}) {
    HostTensor again = p->host;
    p->dev.download(again);
    EXPECT_TRUE(again.same_bytes(first[i])) << "output " << i;
    ++i;
  }
}

// The whole layer (plan, forward, backward) captured once in a CUDA graph, replayed after new
// routing and new gates were copied into the same buffers: same bytes as an eager run.
TEST(CudaMlp, GraphReplayWithNewRouting) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(17);
  const Case c{200, 2, 8, 48, 64, -1, false};
  Plans plans(route(c, rng), c.tokens, c.k, c.experts);
  MlpPairs m(c, DType::kBFloat16, true, c.d_out);
  for (Pair* p : {&m.x, &m.w1, &m.b1, &m.w2, &m.b2, &m.gates, &m.d_out})
    p->fill_and_upload(false, rng);
  const MlpArgs args = m.args(true, Activation::kSilu, true, true);
  DeviceBuffer fws(mlp_forward_workspace_size(args, plans.dev));
  DeviceBuffer bws(mlp_backward_workspace_size(args, plans.dev));
  cudaStream_t stream;
  SCATTERMOE_CUDA_OK(cudaStreamCreate(&stream));
  auto layer = [&]() {
    build_routing_plan(plans.dev_ids.view(), c.experts, plans.dev,
                       Context{stream, {plans.dev_ws.data(), plans.dev_ws.bytes()}});
    mlp_forward(args, plans.dev, m.out.dev.view(), m.hidden.dev.view(),
                Context{stream, {fws.data(), fws.bytes()}});
    mlp_backward(args, plans.dev, m.hidden.dev.view(), m.d_out.dev.view(), m.grads(true, true),
                 Context{stream, {bws.data(), bws.bytes()}});
  };
  cudaGraph_t graph;
  SCATTERMOE_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  layer();
  SCATTERMOE_CUDA_OK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  SCATTERMOE_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));

  for (int round = 0; round < 2; ++round) {
    // New routing and gates in the same device buffers.
    const auto idx = route(c, rng);
    HostTensor ids = check::make_expert_idxs(idx, c.tokens, c.k);
    plans.dev_ids.upload(ids);
    m.gates.fill_and_upload(false, rng);
    for (Pair* p : {&m.out, &m.dx, &m.dw1, &m.dg}) p->dev.poison();
    SCATTERMOE_CUDA_OK(cudaGraphLaunch(exec, stream));
    SCATTERMOE_CUDA_OK(cudaStreamSynchronize(stream));
    std::vector<HostTensor> replayed;
    for (Pair* p : {&m.out, &m.dx, &m.dw1, &m.dg}) {
      replayed.push_back(p->host);
      p->dev.download(replayed.back());
      p->dev.poison();
    }
    layer();
    SCATTERMOE_CUDA_OK(cudaStreamSynchronize(stream));
    int i = 0;
    for (Pair* p : {&m.out, &m.dx, &m.dw1, &m.dg}) {
      HostTensor eager = p->host;
      p->dev.download(eager);
      EXPECT_TRUE(eager.same_bytes(replayed[i])) << "round " << round << " output " << i;
      ++i;
    }
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// L * d_out beyond 2^31 elements: rows far into the output are addressed with 64-bit offsets.
// The CUDA entry points' own checks (what only the kernels require) throw InvalidArgument
// naming the argument, before any kernel runs: here a gradient with zero strides (what a sum's
// gradient looks like before it is made contiguous) and a weight with no unit stride.
TEST(CudaErrors, LayoutsTheKernelsCannotTakeAreRejectedBeforeAnyWrite) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(21);
  const Case c{8, 2, 4, 6, 5, -1, false};
  Plans plans(route(c, rng), c.tokens, c.k, c.experts);
  Pair x(DType::kFloat32, {c.tokens, c.d_in});
  Pair w(DType::kFloat32, {c.experts, c.d_in, c.d_out});
  Pair gates(DType::kFloat32, {c.tokens, c.k});
  Pair d_out(DType::kFloat32, {c.tokens, c.d_out});
  Pair dw(DType::kFloat32, {c.experts, c.d_in, c.d_out});
  for (Pair* p : {&x, &w, &gates, &d_out}) p->fill_and_upload(true, rng);
  dw.poison();
  const ParallelLinearArgs args{x.dev.view(), w.dev.view(), TensorView{}, gates.dev.view(), c.k,
                                false, false};
  ParallelLinearGrads grads;
  grads.dw = dw.dev.view();
  DeviceBuffer ws(parallel_linear_backward_workspace_size(args, plans.dev, grads));
  const Context ctx{nullptr, {ws.data(), ws.bytes()}};
  const std::int64_t shape[2] = {c.tokens, c.d_out};
  const std::int64_t zero[2] = {0, 0};
  const TensorView expanded(d_out.dev.view().data(), DType::kFloat32, 2, shape, zero, Device::cuda(0));
  try {
    parallel_linear_backward(args, plans.dev, expanded, grads, ctx);
    ADD_FAILURE() << "a zero-stride d_out was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'d_out'"), std::string::npos) << e.what();
  }
  // A weight with no unit stride (every dim strided) is named too.
  const std::int64_t w_shape[3] = {c.experts, c.d_in, c.d_out};
  DeviceBuffer wide(static_cast<std::size_t>(c.experts * c.d_in * c.d_out * 2) * sizeof(float));
  const std::int64_t w_strides[3] = {c.d_in * c.d_out * 2, c.d_out * 2, 2};
  ParallelLinearArgs strided = args;
  strided.w = TensorView(wide.data(), DType::kFloat32, 3, w_shape, w_strides, Device::cuda(0));
  try {
    parallel_linear_backward(strided, plans.dev, d_out.dev.view(), grads, ctx);
    ADD_FAILURE() << "a weight with no unit stride was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("'w'"), std::string::npos) << e.what();
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  HostTensor got = dw.host;
  dw.dev.download(got);
  EXPECT_TRUE(got.same_bytes(dw.host)) << "grads.dw was written";
}

TEST(CudaScatter2Scatter, AddressesBeyondTwoToThe31Elements) {
  SCATTERMOE_REQUIRE_GPU();
  std::mt19937_64 rng(18);
  const std::int64_t tokens = 1 << 18, d_in = 32, d_out = 2112;
  const int k = 4, experts = 8;
  const std::int64_t L = tokens * k;
  ASSERT_GT(L * d_out, std::int64_t{1} << 31);
  Plans plans(check::draw_routing(rng, tokens, k, experts), tokens, k, experts);
  Pair x(DType::kBFloat16, {tokens, d_in});
  Pair w(DType::kBFloat16, {experts, d_in, d_out});
  x.fill_and_upload(true, rng);
  w.fill_and_upload(true, rng);
  HostTensor y_host(DType::kBFloat16, {L, d_out});
  DeviceTensor y(y_host);
  y.poison();
  Scatter2ScatterArgs args{x.dev.view(), w.dev.view(), TensorView{}, k, false, false};
  DeviceBuffer ws(scatter2scatter_workspace_size(args, plans.dev));
  scatter2scatter(args, plans.dev, y.view(), device_context(ws));
  SCATTERMOE_CUDA_OK(cudaDeviceSynchronize());
  y.download(y_host);
  // Exact integer check of sampled rows, the last ones included, against float64 on the host
  // (read element by element: the whole output is 4.5 GB).
  const check::Matrix xm = check::to_matrix(x.host.view());
  const auto wm = check::to_matrices(w.host.view());
  const check::Matrix ids = check::to_matrix(plans.host_ids.view());
  const auto* y_bits = reinterpret_cast<const std::uint16_t*>(y_host.bytes());
  for (std::int64_t p : {std::int64_t{0}, L / 2, L - 3, L - 2, L - 1}) {
    const std::int64_t t = p / k;
    const auto e = static_cast<std::int64_t>(ids(t, p % k));
    for (std::int64_t n : {std::int64_t{0}, std::int64_t{1}, d_out / 2, d_out - 2, d_out - 1}) {
      double want = 0;
      for (std::int64_t a = 0; a < d_in; ++a) want += xm(t, a) * wm[e](a, n);
      ASSERT_EQ(detail::bf16_to_float(y_bits[p * d_out + n]), want) << "row " << p << " col " << n;
    }
  }
}

}  // namespace
}  // namespace scattermoe
