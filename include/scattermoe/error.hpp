// Errors. The library never prints or exits: every failure is one of these exceptions.
#pragma once

#include <stdexcept>
#include <string>

namespace scattermoe {

// Bad input: the message names the operation, the argument, its value and what was expected.
// Thrown before any output is written.
class InvalidArgument : public std::invalid_argument {
 public:
  explicit InvalidArgument(const std::string& message) : std::invalid_argument(message) {}
};

// A request this build or machine cannot serve (a backend not compiled in, no such device),
// or a failure reported by the CUDA runtime.
class Unsupported : public std::runtime_error {
 public:
  explicit Unsupported(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace scattermoe
