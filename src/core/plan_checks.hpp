// Checks of a RoutingPlan argument shared by every operation that takes one.
#pragma once

#include <cstdint>

#include "scattermoe/plan.hpp"

namespace scattermoe::detail {

// The three views: defined, rank 1, int64, L / L / E elements, on `device`. When the plan is an
// input (outputs == false) on the CPU, its contents are checked too (ids in range, offsets
// consistent, positions in range). Pass L or E < 0 to accept the plan's own sizes.
void expect_plan_views(const char* op, const RoutingPlan& plan, Device device, std::int64_t L,
                       std::int64_t E, bool outputs);

}  // namespace scattermoe::detail
