// MoA attention on the CPU: forward (out, lse) against a float64 reference written here, with
// causal and non-causal attention, k = 1 and 2, kv_heads 1 and 2, a padding mask with a fully
// masked batch row (and a causal query with no admissible key); backward (dq, dk, dv) against
// the reference's finite differences and against f32 finite differences of the library's own
// forward; determinism; bad arguments.
#include <limits>

#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

struct Geo {
  int B = 2, S = 4, k = 1, H = 1, hd = 3;
  bool causal = true;
  bool mask = true;
  DType mask_dtype = DType::kInt32;
  std::int64_t tokens() const { return std::int64_t{B} * S; }
  std::int64_t rows() const { return tokens() * k; }
  std::int64_t width() const { return std::int64_t{H} * hd; }
  std::string name() const {
    return std::string(causal ? "causal" : "full") + "/k" + std::to_string(k) + "/h" +
           std::to_string(H) + (mask ? "/mask" : "/no-mask");
  }
};

// Batch 0 keeps positions 1..S-1 (so causal query 0 has no key), batch 1 is fully masked.
std::vector<std::int64_t> mask_values(const Geo& g) {
  std::vector<std::int64_t> m(static_cast<std::size_t>(g.tokens()), 1);
  if (!g.mask) return m;
  m[0] = 0;
  for (int s = 0; s < g.S; ++s) m[static_cast<std::size_t>(g.S + s)] = 0;
  return m;
}

struct Ref {
  Matrix out;
  Matrix lse;
};

Ref reference(const Matrix& q, const Matrix& kp, const Matrix& vp,
              const std::vector<std::int64_t>& mask, const Geo& g, double scale) {
  Ref ref{Matrix(g.rows(), g.width()), Matrix(g.rows(), g.H)};
  for (std::int64_t r = 0; r < g.rows(); ++r) {
    const std::int64_t t = r / g.k, b = t / g.S, s = t % g.S;
    for (int h = 0; h < g.H; ++h) {
      std::vector<double> score(static_cast<std::size_t>(g.S), 0.0);
      std::vector<bool> ok(static_cast<std::size_t>(g.S), false);
      double m = -std::numeric_limits<double>::infinity();
      for (int sp = 0; sp < g.S; ++sp) {
        ok[sp] = (!g.causal || sp <= s) && mask[static_cast<std::size_t>(b * g.S + sp)] != 0;
        if (!ok[sp]) continue;
        double d = 0.0;
        for (int c = 0; c < g.hd; ++c) d += q(r, h * g.hd + c) * kp(b * g.S + sp, h * g.hd + c);
        score[sp] = scale * d;
        m = std::max(m, score[sp]);
      }
      double sum = 0.0;
      for (int sp = 0; sp < g.S; ++sp)
        if (ok[sp]) sum += std::exp(score[sp] - m);
      if (sum == 0.0) {
        ref.lse(r, h) = -std::numeric_limits<double>::infinity();
        continue;
      }
      ref.lse(r, h) = m + std::log(sum);
      for (int sp = 0; sp < g.S; ++sp) {
        if (!ok[sp]) continue;
        const double p = std::exp(score[sp] - ref.lse(r, h));
        for (int c = 0; c < g.hd; ++c) ref.out(r, h * g.hd + c) += p * vp(b * g.S + sp, h * g.hd + c);
      }
    }
  }
  return ref;
}

struct Problem {
  Geo g;
  HostTensor q, kp, vp, mask, out, lse, d_out, dq, dk, dv;
  std::vector<std::int64_t> mask_v;
  MoaAttentionArgs args;

  Problem(const Geo& geo, DType dt, std::mt19937_64& rng) : g(geo) {
    q = HostTensor(dt, {g.rows(), g.width()});
    kp = HostTensor(dt, {g.tokens(), g.width()});
    vp = HostTensor(dt, {g.tokens(), g.width()});
    out = HostTensor(dt, {g.rows(), g.width()});
    lse = HostTensor(DType::kFloat32, {g.rows(), g.H});
    d_out = HostTensor(dt, {g.rows(), g.width()});
    dq = HostTensor(dt, {g.rows(), g.width()});
    dk = HostTensor(dt, {g.tokens(), g.width()});
    dv = HostTensor(dt, {g.tokens(), g.width()});
    for (HostTensor* t : {&q, &kp, &vp, &d_out}) check::fill_normal(t->view(), rng);
    for (HostTensor* t : {&out, &lse, &dq, &dk, &dv}) t->poison();
    mask_v = mask_values(g);
    args.q = q.view();
    args.k_proj = kp.view();
    args.v_proj = vp.view();
    if (g.mask) {
      mask = HostTensor(g.mask_dtype, {g.B, g.S});
      std::size_t n = 0;
      check::for_each_index(mask.view(), [&](const std::int64_t* i) {
        check::write_element(mask.view(), i, static_cast<double>(mask_v[n++]));
      });
      args.key_padding_mask = mask.view();
    }
    args.batch = g.B;
    args.seq_len = g.S;
    args.top_k = g.k;
    args.kv_heads = g.H;
    args.head_dim = g.hd;
    args.causal = g.causal;
  }

  void forward() {
    Scratch ws(moa_attention_forward_workspace_size(args));
    moa_attention_forward(args, out.view(), lse.view(), ws.context());
  }
  void backward() {
    Scratch ws(moa_attention_backward_workspace_size(args));
    moa_attention_backward(args, out.view(), lse.view(), d_out.view(), dq.view(), dk.view(),
                           dv.view(), ws.context());
  }
  double scale() const { return 1.0 / std::sqrt(double(g.hd)); }
  Ref ref(const Matrix& qm, const Matrix& km, const Matrix& vm) const {
    return reference(qm, km, vm, mask_v, g, scale());
  }
};

std::vector<Geo> geometries() {
  std::vector<Geo> gs;
  for (bool causal : {true, false})
    for (int k : {1, 2})
      for (int H : {1, 2})
        for (bool mask : {true, false}) {
          Geo g;
          g.causal = causal;
          g.k = k;
          g.H = H;
          g.mask = mask;
          g.mask_dtype = (k + H) % 2 ? DType::kInt64 : DType::kInt32;
          gs.push_back(g);
        }
  return gs;
}

// lse compared where finite; -inf exactly where the reference has no admissible key.
::testing::AssertionResult lse_matches(const TensorView& got, const Matrix& want) {
  const Matrix m = read(got);
  for (std::size_t n = 0; n < want.v.size(); ++n) {
    if (std::isinf(want.v[n])) {
      if (!(std::isinf(m.v[n]) && m.v[n] < 0))
        return ::testing::AssertionFailure() << "lse element " << n << " is " << m.v[n]
                                             << "; expected -inf";
    } else if (!(std::fabs(m.v[n] - want.v[n]) <= 1e-5 * (1 + std::fabs(want.v[n])))) {
      return ::testing::AssertionFailure() << "lse element " << n << " is " << m.v[n]
                                           << "; expected " << want.v[n];
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(MoaAttention, ForwardMatchesFloat64Reference) {
  std::mt19937_64 rng(11);
  for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    for (const Geo& g : geometries()) {
      SCOPED_TRACE(g.name() + "/" + short_name(dt));
      Problem p(g, dt, rng);
      p.forward();
      const Ref want = p.ref(read(p.q.view()), read(p.kp.view()), read(p.vp.view()));
      EXPECT_TRUE(close_to(p.out.view(), want.out));
      if (dt == DType::kFloat32) {
        EXPECT_TRUE(lse_matches(p.lse.view(), want.lse));
      }
      if (g.mask) {  // batch 1 is fully masked: its rows are exact zeros
        const Matrix o = read(p.out.view());
        for (std::int64_t r = g.rows() / 2; r < g.rows(); ++r) {
          for (std::int64_t c = 0; c < g.width(); ++c) {
            ASSERT_EQ(o(r, c), 0.0);
          }
        }
      }
    }
  }
}

TEST(MoaAttention, ExplicitScale) {
  std::mt19937_64 rng(5);
  Geo g;
  g.k = 2;
  g.H = 2;
  Problem p(g, DType::kFloat32, rng);
  p.args.scale = 0.7f;
  p.forward();
  const Ref want = reference(read(p.q.view()), read(p.kp.view()), read(p.vp.view()), p.mask_v, g, 0.7);
  EXPECT_TRUE(close_to(p.out.view(), want.out));
}

// Backward against central differences of the float64 reference of sum(out * d_out), and
// against f32 central differences of the library's own forward.
TEST(MoaAttention, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(23);
  for (const Geo& g : geometries()) {
    SCOPED_TRACE(g.name());
    Problem p(g, DType::kFloat32, rng);
    p.forward();
    p.backward();
    Matrix qm = read(p.q.view()), km = read(p.kp.view()), vm = read(p.vp.view());
    const Matrix r = read(p.d_out.view());
    auto ref_loss = [&] { return weighted_sum(p.ref(qm, km, vm).out, r); };
    EXPECT_TRUE(close_to(read(p.dq.view()), finite_difference(qm, 1e-6, ref_loss), 1e-4));
    EXPECT_TRUE(close_to(read(p.dk.view()), finite_difference(km, 1e-6, ref_loss), 1e-4));
    EXPECT_TRUE(close_to(read(p.dv.view()), finite_difference(vm, 1e-6, ref_loss), 1e-4));

    HostTensor out2(DType::kFloat32, {g.rows(), g.width()}), lse2(DType::kFloat32, {g.rows(), g.H});
    auto lib_loss = [&] {
      Scratch ws(moa_attention_forward_workspace_size(p.args));
      moa_attention_forward(p.args, out2.view(), lse2.view(), ws.context());
      return weighted_sum(read(out2.view()), r);
    };
    EXPECT_TRUE(close_to(read(p.dq.view()), finite_difference(p.q.view(), 1e-2, lib_loss), 2e-2));
    EXPECT_TRUE(close_to(read(p.dk.view()), finite_difference(p.kp.view(), 1e-2, lib_loss), 2e-2));
    EXPECT_TRUE(close_to(read(p.dv.view()), finite_difference(p.vp.view(), 1e-2, lib_loss), 2e-2));

    if (g.mask) {  // fully masked batch: zero gradients for its queries, keys and values
      const Matrix dq = read(p.dq.view()), dk = read(p.dk.view()), dv = read(p.dv.view());
      for (std::int64_t c = 0; c < g.width(); ++c) {
        for (std::int64_t row = g.rows() / 2; row < g.rows(); ++row) ASSERT_EQ(dq(row, c), 0.0);
        for (std::int64_t t = g.tokens() / 2; t < g.tokens(); ++t) {
          ASSERT_EQ(dk(t, c), 0.0);
          ASSERT_EQ(dv(t, c), 0.0);
        }
      }
    }
  }
}

TEST(MoaAttention, BackwardSixteenBitCloseToFloat32) {
  std::mt19937_64 rng(31);
  Geo g;
  g.k = 2;
  g.H = 2;
  g.S = 6;
  for (DType dt : {DType::kBFloat16, DType::kFloat16}) {
    SCOPED_TRACE(short_name(dt));
    Problem p(g, dt, rng);
    p.forward();
    p.backward();
    // The float64 reference's finite differences on the rounded inputs.
    Matrix qm = read(p.q.view()), km = read(p.kp.view()), vm = read(p.vp.view());
    const Matrix r = read(p.d_out.view());
    auto ref_loss = [&] { return weighted_sum(p.ref(qm, km, vm).out, r); };
    const double tol = 8 * check::tolerance_for(dt);
    EXPECT_TRUE(close_to(read(p.dq.view()), finite_difference(qm, 1e-6, ref_loss), tol));
    EXPECT_TRUE(close_to(read(p.dk.view()), finite_difference(km, 1e-6, ref_loss), tol));
    EXPECT_TRUE(close_to(read(p.dv.view()), finite_difference(vm, 1e-6, ref_loss), tol));
  }
}

TEST(MoaAttention, DeterministicAndSkipsUndefinedGradients) {
  std::mt19937_64 rng(41);
  Geo g;
  g.B = 3;
  g.S = 64;
  g.k = 2;
  g.H = 2;
  g.hd = 16;
  g.causal = true;
  g.mask = false;
  Problem a(g, DType::kFloat32, rng);
  a.forward();
  a.backward();
  HostTensor dk1 = a.dk, dv1 = a.dv, dq1 = a.dq;
  a.backward();
  EXPECT_TRUE(a.dk.same_bytes(dk1));
  EXPECT_TRUE(a.dv.same_bytes(dv1));
  EXPECT_TRUE(a.dq.same_bytes(dq1));
  // Only dv requested.
  HostTensor dv2(DType::kFloat32, {g.tokens(), g.width()});
  Scratch ws(moa_attention_backward_workspace_size(a.args));
  moa_attention_backward(a.args, a.out.view(), a.lse.view(), a.d_out.view(), TensorView(),
                         TensorView(), dv2.view(), ws.context());
  EXPECT_TRUE(dv2.same_bytes(dv1));
}

TEST(MoaAttention, EmptyBatch) {
  std::mt19937_64 rng(3);
  Geo g;
  g.B = 0;
  g.mask = false;
  Problem p(g, DType::kFloat32, rng);
  EXPECT_NO_THROW(p.forward());
  EXPECT_NO_THROW(p.backward());
}

TEST(MoaAttention, BadArgumentsNameTheArgument) {
  std::mt19937_64 rng(7);
  Geo g;
  g.k = 2;
  g.H = 2;
  Problem p(g, DType::kFloat32, rng);
  Scratch ws(1 << 16);
  Context ctx = ws.context();
  const HostTensor out_before = p.out;
  auto fwd = [&](const MoaAttentionArgs& a, const TensorView& out, const TensorView& lse) {
    moa_attention_forward(a, out, lse, ctx);
  };
  auto bwd = [&](const MoaAttentionArgs& a, const TensorView& dq, const TensorView& dk,
                 const TensorView& dv) {
    moa_attention_backward(a, p.out.view(), p.lse.view(), p.d_out.view(), dq, dk, dv, ctx);
  };
  const char* F = "moa_attention_forward";
  const char* Bk = "moa_attention_backward";

  HostTensor bad_q(DType::kFloat32, {g.rows() + 1, g.width()});
  MoaAttentionArgs a = p.args;
  a.q = bad_q.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(a, p.out.view(), p.lse.view()), F, "q");

  HostTensor bad_k(DType::kFloat32, {g.tokens(), g.width() + 1});
  a = p.args;
  a.k_proj = bad_k.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(a, p.out.view(), p.lse.view()), F, "k_proj");
  a = p.args;
  a.v_proj = bad_k.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(bwd(a, p.dq.view(), p.dk.view(), p.dv.view()), Bk, "v_proj");

  HostTensor bf_k(DType::kBFloat16, {g.tokens(), g.width()});
  a = p.args;
  a.k_proj = bf_k.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(a, p.out.view(), p.lse.view()), F, "k_proj");

  HostTensor bad_mask(DType::kInt32, {g.B, g.S + 1});
  a = p.args;
  a.key_padding_mask = bad_mask.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(a, p.out.view(), p.lse.view()), F, "key_padding_mask");
  HostTensor float_mask(DType::kFloat32, {g.B, g.S});
  a.key_padding_mask = float_mask.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(a, p.out.view(), p.lse.view()), F, "key_padding_mask");

  a = p.args;
  a.top_k = 0;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(a, p.out.view(), p.lse.view()), F, "top_k");
  a = p.args;
  a.head_dim = 2;  // q's width no longer h_kv*hd
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(a, p.out.view(), p.lse.view()), F, "q");

  HostTensor bad_out(DType::kFloat32, {g.rows(), g.width() + 1});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(p.args, bad_out.view(), p.lse.view()), F, "out");
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(p.args, p.q.view(), p.lse.view()), F, "out");
  HostTensor bf_lse(DType::kBFloat16, {g.rows(), g.H});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(p.args, p.out.view(), bf_lse.view()), F, "lse");
  HostTensor bad_lse(DType::kFloat32, {g.rows(), g.H + 1});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(fwd(p.args, p.out.view(), bad_lse.view()), F, "lse");
  EXPECT_TRUE(p.out.same_bytes(out_before));  // nothing written before the throw

  HostTensor bad_dk(DType::kFloat32, {g.rows(), g.width()});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(bwd(p.args, p.dq.view(), bad_dk.view(), p.dv.view()), Bk, "dk");
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(bwd(p.args, p.dq.view(), p.dk.view(), p.dk.view()), Bk, "dv");
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(bwd(p.args, p.d_out.view(), p.dk.view(), p.dv.view()), Bk, "dq");
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      moa_attention_backward(p.args, p.out.view(), bad_lse.view(), p.d_out.view(), p.dq.view(),
                             p.dk.view(), p.dv.view(), ctx),
      Bk, "lse");

  // CUDA tensors: a clean Unsupported, never a crash.
  a = p.args;
  a.q = TensorView(p.q.view().data(), DType::kFloat32, {g.rows(), g.width()}, {g.width(), 1},
                   Device::cuda(0));
  a.k_proj = TensorView(p.kp.view().data(), DType::kFloat32, {g.tokens(), g.width()},
                        {g.width(), 1}, Device::cuda(0));
  a.v_proj = TensorView(p.vp.view().data(), DType::kFloat32, {g.tokens(), g.width()},
                        {g.width(), 1}, Device::cuda(0));
  a.key_padding_mask = TensorView();
  EXPECT_THROW(moa_attention_forward_workspace_size(a), Unsupported);
}

}  // namespace
}  // namespace scattermoe::testing
