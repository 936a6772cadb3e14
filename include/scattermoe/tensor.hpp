// Non-owning tensor views: the only way data crosses the public API.
//
// A TensorView names memory that the caller owns: a data pointer, an element type, a shape
// and strides (in elements, not bytes), and the device the memory lives on. Views may be
// non-contiguous (a transposed weight is a view with swapped strides, never a copy).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace scattermoe {

// Element types. Float types are storage types: arithmetic always accumulates in fp32.
enum class DType : std::uint8_t { kFloat32, kFloat16, kBFloat16, kInt32, kInt64 };

enum class DeviceType : std::uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;  // CUDA ordinal; 0 for the CPU

  static constexpr Device cpu() { return Device{DeviceType::kCPU, 0}; }
  static constexpr Device cuda(int index = 0) { return Device{DeviceType::kCUDA, index}; }
};

constexpr bool operator==(Device a, Device b) { return a.type == b.type && a.index == b.index; }
constexpr bool operator!=(Device a, Device b) { return !(a == b); }

// Bytes of one element.
std::size_t dtype_size(DType dtype);
// "f32", "f16", "bf16", "i32", "i64".
const char* dtype_name(DType dtype);
bool is_floating(DType dtype);
bool is_integral(DType dtype);
// Parses the names dtype_name() returns (and "float32", "float16", "bfloat16"); throws
// InvalidArgument for anything else.
DType parse_dtype(const std::string& name);
// "cpu" or "cuda:N".
std::string device_name(Device device);

class TensorView {
 public:
  static constexpr int kMaxRank = 4;

  // An undefined view: stands for an absent optional argument (no bias, no gates, ...).
  TensorView() = default;

  // A view with explicit strides (in elements).
  TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
             std::initializer_list<std::int64_t> strides, Device device = Device::cpu());
  TensorView(void* data, DType dtype, int rank, const std::int64_t* shape,
             const std::int64_t* strides, Device device = Device::cpu());

  // A row-major contiguous view.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                               Device device = Device::cpu());
  static TensorView contiguous(const void* data, DType dtype,
                               std::initializer_list<std::int64_t> shape,
                               Device device = Device::cpu()) {
    return contiguous(const_cast<void*>(data), dtype, shape, device);
  }
  // contiguous(nullptr, ...) (an empty tensor without memory); without it the call would be
  // ambiguous between the two overloads above.
  static TensorView contiguous(std::nullptr_t, DType dtype,
                               std::initializer_list<std::int64_t> shape,
                               Device device = Device::cpu()) {
    return contiguous(static_cast<void*>(nullptr), dtype, shape, device);
  }

  bool defined() const { return rank_ >= 0; }
  void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int rank() const { return rank_; }
  std::int64_t size(int dim) const { return shape_[dim]; }
  std::int64_t stride(int dim) const { return strides_[dim]; }
  std::int64_t numel() const;
  bool is_contiguous() const;

  // The same memory with two dimensions swapped (no copy).
  TensorView transposed(int dim0, int dim1) const;
  // The slice [begin, end) of dimension `dim` (no copy).
  TensorView narrowed(int dim, std::int64_t begin, std::int64_t end) const;

  // [first, last) byte range that the view can touch; empty (first == last) when numel is 0.
  const char* first_byte() const;
  const char* last_byte() const;

  // "bf16[8, 64, 32] strides [2048, 1, 64] on cpu", for error messages.
  std::string describe() const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kFloat32;
  Device device_ = Device::cpu();
  int rank_ = -1;
  std::int64_t shape_[kMaxRank] = {0, 0, 0, 0};
  std::int64_t strides_[kMaxRank] = {0, 0, 0, 0};
};

// True when the byte ranges the two views span overlap (same device only). Conservative:
// interleaved views of one buffer (two column halves of a matrix) count as overlapping.
bool views_overlap(const TensorView& a, const TensorView& b);

}  // namespace scattermoe
