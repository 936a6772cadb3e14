"""scattermoe.integrations against transformers' own eager experts forward (tiny random configs;
fp32 on cpu and cuda, bf16 for Mixtral and Qwen3-MoE)."""
import copy

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: the Hugging Face integration tests skip")
pytest.importorskip("transformers.integrations.moe",
                    reason="transformers >= 5 (ExpertsInterface) is needed for the integration")

from scattermoe.integrations import replace_moe_blocks  # noqa: E402


def _mixtral(layers=2):
    cfg = transformers.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128)
    return transformers.MixtralForCausalLM(cfg)


def _qwen3_moe(norm_topk_prob, layers=2):
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=3, vocab_size=128, norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=[])
    return transformers.Qwen3MoeForCausalLM(cfg)


_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, num_experts_per_tok=2)


def _olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(num_experts=4, **_COMMON))


def _qwen2_moe():
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80, **_COMMON))


def _granitemoe():
    return transformers.GraniteMoeForCausalLM(
        transformers.GraniteMoeConfig(num_local_experts=4, **_COMMON))


def _gpt_oss():
    """Transposed, interleaved gate/up with biases and the clamped GPT-OSS gate."""
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        num_local_experts=4, head_dim=16, layer_types=["full_attention"] * 2, **_COMMON))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bias" in n:  # nonzero biases so that they are exercised
                p.normal_(std=0.1)
    return model


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float() ** 2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize(
    "build", [_mixtral, lambda: _qwen3_moe(True), lambda: _qwen3_moe(False), _olmoe, _qwen2_moe,
              _granitemoe, _gpt_oss],
    ids=["mixtral", "qwen3_moe_norm_topk", "qwen3_moe_no_norm", "olmoe", "qwen2_moe",
         "granitemoe", "gpt_oss"])
def test_matches_eager_forward_and_gradients(build, device, monkeypatch):
    """fp32: our kernels and the eager loop differ only in the order of fp32 sums."""
    import scattermoe.integrations as integ
    calls = []
    real = integ.parallel_linear
    monkeypatch.setattr(integ, "parallel_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = build().float().to(device)
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 7)).to(device)
    ref_logits, ref_grads = _run(model, ids)

    ours = copy.deepcopy(model)
    expert_ptrs = {n: p.data_ptr() for n, p in ours.named_parameters() if ".experts." in n}
    assert expert_ptrs, "no stacked expert parameters found"
    n_params = sum(p.numel() for p in ours.parameters())
    replace_moe_blocks(ours)
    assert ours.config._experts_implementation == "scattermoe"
    # Same parameters, used in place: no second copy of any expert weight.
    assert {n: p.data_ptr() for n, p in ours.named_parameters() if ".experts." in n} == expert_ptrs
    assert sum(p.numel() for p in ours.parameters()) == n_params

    logits, grads = _run(ours, ids)
    assert len(calls) == 2 * ours.config.num_hidden_layers  # our kernels ran, in every layer
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    checked = [n for n in grads if ".experts." in n or ".gate." in n or "embed_tokens" in n]
    assert any(".experts.gate_up_proj" in n for n in checked)
    assert any(".experts.down_proj" in n for n in checked)
    assert any(".gate." in n or ".router." in n for n in grads)  # router weights
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _within_twice_eager_error(name, ours, eager, ref):
    """ours and eager in bf16 against ref (fp32 on the same bf16 weights): our error at most twice
    the eager bf16 model's own, plus one bf16 rounding (2^-8 relative) at the reference's scale,
    the rule FlashAttention's tests use for a reduced-precision kernel."""
    ours, eager, ref = (t.detach().cpu().double() for t in (ours, eager, ref))
    err, err_eager = (ours - ref).abs().max().item(), (eager - ref).abs().max().item()
    atol = 2.0 ** -8 * ref.abs().max().item()
    assert err <= 2 * err_eager + atol, (f"{name}: error {err:.3g} > 2 * eager bf16 error "
                                         f"{err_eager:.3g} + {atol:.3g}")


@pytest.mark.parametrize("build", [lambda: _mixtral(layers=1), lambda: _qwen3_moe(True, layers=1)],
                         ids=["mixtral", "qwen3_moe"])
def test_bf16_error_within_twice_eager_bf16(build, device):
    """The bf16 model with our experts against the same bf16 model with transformers' eager
    experts, both measured against fp32 computation on the same (bf16-rounded) weights. One
    layer: its router sees the same input in both bf16 models, so both route alike (a second
    layer's router could flip a near tie on one model's rounding and not the other's)."""
    torch.manual_seed(0)
    model = build().to(device=device, dtype=torch.bfloat16)
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    model.train()
    reference = copy.deepcopy(model).float()
    ours = replace_moe_blocks(copy.deepcopy(model))
    ids = torch.randint(0, model.config.vocab_size, (2, 7)).to(device)
    ref_logits, ref_grads = _run(reference, ids)
    eager_logits, eager_grads = _run(model, ids)
    logits, grads = _run(ours, ids)
    assert logits.dtype == torch.bfloat16
    _within_twice_eager_error("logits", logits, eager_logits, ref_logits)
    assert grads.keys() == ref_grads.keys() == eager_grads.keys()
    assert any(".experts.gate_up_proj" in n for n in grads)
    for n in grads:
        _within_twice_eager_error(n, grads[n], eager_grads[n], ref_grads[n])


def test_mixtral_expert_weight_layout():
    """gate_up_proj (E, 2I, H) is [w1 (gate); w3 (up)]: check one token through expert 0 by hand."""
    torch.manual_seed(1)
    model = _mixtral().float()
    replace_moe_blocks(model)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 64)
    idx = torch.zeros(5, 1, dtype=torch.long)
    w = torch.ones(5, 1)
    y = experts(x, idx, w)
    w1, w3 = experts.gate_up_proj[0].chunk(2, dim=0)
    expect = (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ experts.down_proj[0].T
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-5)


def test_rejects_model_without_experts():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    with pytest.raises(ValueError, match="no experts module"):
        replace_moe_blocks(transformers.LlamaForCausalLM(cfg))
