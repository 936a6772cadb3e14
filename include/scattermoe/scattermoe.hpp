// ScatterMoE: sparse Mixture-of-Experts layers without padding or per-expert copies.
// Umbrella header of the public C++ API.
#pragma once

#include "scattermoe/build_info.hpp"
#include "scattermoe/context.hpp"
#include "scattermoe/error.hpp"
#include "scattermoe/modules.hpp"
#include "scattermoe/moa.hpp"
#include "scattermoe/ops.hpp"
#include "scattermoe/plan.hpp"
#include "scattermoe/tensor.hpp"
