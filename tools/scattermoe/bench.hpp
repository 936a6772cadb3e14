// `scattermoe bench`: times a SwiGLU SMoE MLP forward, backward and forward+backward (routing
// plan included) on a preset or explicit shape; on CUDA also, on the same inputs, the cuBLAS
// ceiling and a per-expert cuBLAS loop (bench_cublas.hpp). Prints a table, a memory report and a
// "summary: " line, and optionally writes JSON.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace scattermoe::tools {

// T tokens, d model width, h expert hidden width (the GLU's first projection is d -> 2h),
// E experts, k experts per token.
struct LayerShape {
  std::int64_t tokens = 0;
  std::int64_t d_model = 0;
  std::int64_t d_ff = 0;
  std::int64_t experts = 0;
  std::int64_t topk = 0;
};

struct Preset {
  std::string name;
  LayerShape shape;
  std::string source;  // where the shape comes from
};

const std::vector<Preset>& bench_presets();
// The preset table for --help.
std::string bench_presets_help();

// What the command line asked for; zero / empty / negative fields mean "the default".
struct BenchOptions {
  std::string preset;  // default: tiny on the CPU, mixtral-8x7b on a GPU
  LayerShape shape;    // fields that are > 0 override the preset's
  std::string dtype = "bf16";
  std::string device;  // default: cuda:0 if the CUDA backend and a GPU are there, else cpu
  std::string activation = "silu";
  int iters = -1;      // default: 5 on the CPU, 10 on CUDA
  int warmup = -1;     // default: 1 on the CPU, 3 on CUDA
  std::uint64_t seed = 0;
  std::int64_t check_rows = -1;  // default: all rows up to 1 GFLOP of forward, else 4
  std::string json_path;         // empty: no JSON
  bool allow_slow = false;
};

// Returns the exit status: 0 ran and the check passed, 1 the check failed. Throws UsageError
// (and the library's InvalidArgument / Unsupported) for requests it refuses.
int run_bench(const BenchOptions& options);

}  // namespace scattermoe::tools
