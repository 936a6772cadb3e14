// The `scattermoe` command-line program: parses the command line and hands over to one
// subcommand (bench.cpp, check.cpp, info.cpp). Exit status: 0 success, 1 a check failed or an
// unexpected error, 2 a request that was refused (bad arguments, unsupported device, too slow).
#include <algorithm>
#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench.hpp"
#include "check.hpp"
#include "common.hpp"
#include "info.hpp"
#include "scattermoe/build_info.hpp"
#include "scattermoe/error.hpp"

namespace {

constexpr int kExitFailure = 1;
constexpr int kExitRefused = 2;

// One line on stderr, whatever the message contains.
void print_error(const std::string& message) {
  std::string line = message;
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  std::fprintf(stderr, "scattermoe: error: %s\n", line.c_str());
}

// An integer option's lower bound, with a readable message ("--tokens: must be >= 1, got -3").
CLI::Validator at_least(long long minimum) {
  return CLI::Validator(
      [minimum](std::string& text) -> std::string {
        try {
          std::size_t used = 0;
          const long long value = std::stoll(text, &used);
          if (used == text.size() && value >= minimum) return {};
        } catch (const std::exception&) {
        }
        return "must be an integer >= " + std::to_string(minimum) + ", got '" + text + "'";
      },
      ">=" + std::to_string(minimum));
}

// Subcommands inherit the top-level --help (which prints everything); theirs print just them.
void set_subcommand_help(CLI::App& sub) {
  sub.set_help_all_flag();
  sub.set_help_flag("-h,--help", "Print this subcommand's help and exit");
}

void add_bench_options(CLI::App& bench, scattermoe::tools::BenchOptions& o) {
  using scattermoe::tools::bench_presets;
  std::vector<std::string> names;
  for (const auto& p : bench_presets()) names.push_back(p.name);
  bench.add_option("preset,--preset", o.preset,
                   "Layer shape to run (table below); default: tiny on the CPU, mixtral-8x7b on "
                   "a GPU")
      ->check(CLI::IsMember(names));
  bench.add_option("--tokens", o.shape.tokens, "T: tokens in the batch (overrides the preset)")
      ->check(at_least(1));
  bench.add_option("--d-model", o.shape.d_model, "d: model width (overrides the preset)")
      ->check(at_least(1));
  bench.add_option("--d-ff", o.shape.d_ff,
                   "h: expert hidden width; the first projection is d -> 2h (overrides the "
                   "preset)")
      ->check(at_least(1));
  bench.add_option("--experts", o.shape.experts, "E: number of experts (overrides the preset)")
      ->check(at_least(1));
  bench.add_option("--topk", o.shape.topk, "k: experts per token, <= E (overrides the preset)")
      ->check(at_least(1));
  bench.add_option("--dtype", o.dtype,
                   "Storage type of activations, weights, gates and gradients (fp32 accumulation)")
      ->check(CLI::IsMember({"bf16", "f16", "f32"}))
      ->capture_default_str();
  bench.add_option("--device", o.device,
                   "cpu, cuda or cuda:N; default: cuda:0 when the CUDA backend is compiled in "
                   "and a GPU is present, else cpu");
  bench.add_option("--activation", o.activation, "Activation of the gate half: act(gate) * up")
      ->check(CLI::IsMember({"silu", "gelu", "gelu_tanh", "relu"}))
      ->capture_default_str();
  bench.add_option("--iters", o.iters,
                   "Timed iterations; the median is reported (default: 5 on the CPU, 10 on CUDA)")
      ->check(at_least(1));
  bench.add_option("--warmup", o.warmup,
                   "Untimed iterations before timing (default: 1 on the CPU, 3 on CUDA)")
      ->check(at_least(0));
  bench.add_option("--seed", o.seed, "Seed of the random inputs and router logits")
      ->capture_default_str();
  bench.add_option("--check-rows", o.check_rows,
                   "Token rows of the forward output checked against the float64 oracle; 0 "
                   "skips the check (default: all rows when the forward is <= 1 GFLOP, else 4)")
      ->check(at_least(0));
  bench.add_option("--json", o.json_path, "Also write the results to this JSON file");
  bench.add_flag("--allow-slow", o.allow_slow,
                 "Run even when the estimated time exceeds 2 minutes (large presets on the CPU "
                 "take hours)");
}

}  // namespace

int main(int argc, char** argv) {
  namespace tools = scattermoe::tools;

  CLI::App app{
      "scattermoe: sparse Mixture-of-Experts layers without padding (ScatterMoE, arXiv "
      "2403.08245).\nWithout a subcommand it runs `bench` (`scattermoe` alone: the default "
      "benchmark; `scattermoe --preset X ...`: bench options).",
      "scattermoe"};
  // --help shows every subcommand with its options; `scattermoe SUBCOMMAND --help` just one.
  app.set_help_flag();
  app.set_help_all_flag("-h,--help", "Print this help (every subcommand and option) and exit");
  app.set_version_flag("--version", scattermoe::build_info().version);
  app.require_subcommand(0, 1);
  app.footer(
      "Exit status: 0 success; 1 a correctness check failed (or an unexpected error); 2 bad "
      "arguments or a refused request.\n\n" +
      tools::bench_presets_help());

  tools::BenchOptions bench_options;
  CLI::App* bench = app.add_subcommand(
      "bench",
      "Time a SwiGLU SMoE MLP forward, backward and forward + backward (routing plan built "
      "every iteration), report ms, TFLOP/s, memory and a correctness check of the output; on "
      "CUDA also the cuBLAS ceiling and a per-expert cuBLAS loop on the same inputs; prints "
      "a 'summary: ' line; exit 1 if the check fails");
  set_subcommand_help(*bench);
  bench->footer(tools::bench_presets_help() +
                "\n\nExit status: 0 ran and the check passed; 1 the check failed; 2 bad arguments, "
                "an unavailable device, or a run refused as too slow or too large.");
  add_bench_options(*bench, bench_options);

  tools::CheckOptions check_options;
  CLI::App* check = app.add_subcommand(
      "check",
      "Run the correctness suite (every op and layer against a float64 oracle; exact checks on "
      "small-integer inputs); prints one line per check and 'N passed, M failed'; exit 0 iff "
      "all passed");
  set_subcommand_help(*check);
  check->footer("Exit status: 0 every check passed; 1 a check failed; 2 bad arguments.");
  check->add_option("--device", check_options.device, "cpu, cuda or cuda:N")
      ->capture_default_str();
  check->add_option("--dtype", check_options.dtype,
                    "Only this storage type (default: f32, bf16 and f16)")
      ->check(CLI::IsMember({"bf16", "f16", "f32"}));
  check->add_option("--seed", check_options.seed, "Seed of the random inputs")
      ->capture_default_str();

  CLI::App* info = app.add_subcommand(
      "info", "Print the build (version, compiled backends, CUDA architectures) and the devices");
  set_subcommand_help(*info);
  info->footer("");

  // `scattermoe --preset tiny ...` means `scattermoe bench --preset tiny ...`.
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && args[0].size() > 1 && args[0][0] == '-' && args[0] != "-h" &&
      args[0] != "--help" && args[0] != "--version") {
    args.insert(args.begin(), "bench");
  }
  std::reverse(args.begin(), args.end());  // CLI11 takes the arguments last-first

  try {
    app.parse(args);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    print_error(std::string(e.what()) + " (run 'scattermoe --help' for usage)");
    return kExitRefused;
  }

  try {
    if (check->parsed()) return tools::run_check(check_options);
    if (info->parsed()) return tools::run_info();
    return tools::run_bench(bench_options);  // `bench`, or no subcommand at all
  } catch (const tools::UsageError& e) {
    print_error(e.what());
    return kExitRefused;
  } catch (const scattermoe::InvalidArgument& e) {
    print_error(e.what());
    return kExitRefused;
  } catch (const scattermoe::Unsupported& e) {
    print_error(e.what());
    return kExitRefused;
  } catch (const std::bad_alloc&) {
    print_error("out of memory");
    return kExitFailure;
  } catch (const std::exception& e) {
    print_error(e.what());
    return kExitFailure;
  }
}
