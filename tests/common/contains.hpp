// A substring assertion for error messages (plain GoogleTest, no gmock needed).
#pragma once

#include <gtest/gtest.h>

#include <string>

namespace scattermoe::testing {

inline ::testing::AssertionResult contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << text << "\" does not contain \"" << part << "\"";
}

}  // namespace scattermoe::testing
