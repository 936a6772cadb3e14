// Implementations the bench times next to the library's layer, in the same run and on the same
// inputs, so that its times come with ratios measured under the same conditions: on CUDA the
// cuBLAS ceiling and the per-expert cuBLAS loop (bench_cublas.cu); none on the CPU.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "bench.hpp"
#include "bench_device.hpp"
#include "scattermoe/context.hpp"
#include "scattermoe/modules.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::tools {

// The layer's operands as the bench set them up on the device. T tokens, d model width, h expert
// hidden width, E experts, k choices per token.
struct BenchLayer {
  LayerShape shape;
  DType dtype = DType::kBFloat16;
  Activation activation = Activation::kSilu;  // of the GLU's gate half: act(gate) * up
  TensorView x;                               // (T, d)
  TensorView expert_idxs;                     // (T, k) int64
  TensorView gates;                           // (T, k), dtype
  TensorView d_out;                           // (T, d): the upstream gradient
  // Parameters in nn.Linear storage, contiguous; rows [0, h) of w1 are "up", [h, 2h) "gate".
  TensorView w1;  // (E, 2h, d)
  TensorView w2;  // (E, d, h)
  // Weight gradients in the parameters' storage. The comparisons write theirs here too (the
  // implementations' calls run one after another on one stream), which keeps the largest
  // buffers single.
  TensorView dw1;  // (E, 2h, d)
  TensorView dw2;  // (E, d, h)
};

class BenchComparison {
 public:
  virtual ~BenchComparison() = default;

  // JSON key and table column: "ceiling", "baseline".
  virtual std::string key() const = 0;
  // One sentence for the table's legend and the JSON.
  virtual std::string description() const = 0;

  // Enqueue one forward / one backward on the bench's stream; they may synchronise with the host
  // (the per-expert loop reads the expert offsets there, as an eager loop does).
  virtual void forward() = 0;
  virtual void backward() = 0;

  // Device bytes this implementation needs beyond the inputs and weights (its own buffers and
  // the weight gradients it writes), as the layer's "extra" counts them.
  virtual std::size_t extra_bytes() const = 0;

  // Its results that should equal the layer's (after forward() and backward()): out (T, d),
  // dx (T, d), d_gates (T, k). Undefined views when it computes no such thing.
  virtual TensorView out() const { return {}; }
  virtual TensorView dx() const { return {}; }
  virtual TensorView d_gates() const { return {}; }
};

// The comparisons of the layer's device, in the order the table shows them (empty on the CPU).
// The operands must already hold their values: the comparisons run once to fill their own
// buffers before they are timed.
std::vector<std::unique_ptr<BenchComparison>> make_bench_comparisons(BenchDevice& device,
                                                                     const BenchLayer& layer,
                                                                     const Context& ctx);

}  // namespace scattermoe::tools
