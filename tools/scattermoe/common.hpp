// Pieces shared by the subcommands of the `scattermoe` program.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

#include "scattermoe/tensor.hpp"

namespace scattermoe::tools {

// A request the program refuses before doing any work (bad option value, a run that would take
// hours): main prints it as one line and exits with status 2.
class UsageError : public std::runtime_error {
 public:
  explicit UsageError(const std::string& message) : std::runtime_error(message) {}
};

// "cpu", "cuda" (= cuda:0) or "cuda:N"; throws UsageError otherwise.
Device parse_device_option(const std::string& text);

// cuda:0 when the CUDA backend is compiled in and the runtime reports a device, else the CPU.
Device default_device();

// "1.50 GiB", "12.0 MiB", "512 B".
std::string format_bytes(std::size_t bytes);

// "850 ms", "12.3 s", "4.2 min", "5.1 h".
std::string format_seconds(double seconds);

}  // namespace scattermoe::tools
