"""The side network is Algorithm 1 exactly: parameter counts by hand, and a naive loop reference."""

from __future__ import annotations

import pytest
import torch

from read_cache.errors import ReadCacheError
from read_cache.training.side_network import (
    SideNetwork,
    SideNetworkConfig,
    count_trainable,
    padded_rows,
    parameter_breakdown,
    pool,
)

T5_BASE = dict(d_model=768, n_encoder_layers=12, n_decoder_layers=12)


def rnn_params(gates: int, d: int = 768, r: int = 256) -> int:
    """One single-layer torch RNN: gates x (W_ih [r, d] + W_hh [r, r] + two biases [r])."""
    return gates * (r * d + r * r + 2 * r)


def test_t5_base_gru_256_has_the_papers_size() -> None:
    net = SideNetwork(SideNetworkConfig(rnn="gru", dim=256, **T5_BASE))
    assert count_trainable(net) == 1_969_920 + 2 * 768  # Table 4's 1.97 M, plus the two joiner scales
    assert parameter_breakdown(net) == {
        "encoder_norm": 768,
        "encoder_rnn": 787_968,
        "psi": 196_608,
        "decoder_norm": 768,
        "decoder_rnn": 787_968,
        "up": 197_376,
    }
    assert "lm_rows" in dict(net.named_buffers())  # the frozen LM head is a buffer, not a parameter


@pytest.mark.parametrize(("rnn", "gates"), [("lstm", 4), ("rnn", 1), ("gru", 3)])
def test_counts_of_every_cell(rnn: str, gates: int) -> None:
    net = SideNetwork(SideNetworkConfig(rnn=rnn, dim=256, **T5_BASE))
    assert rnn_params(gates) == {"lstm": 1_050_624, "rnn": 262_656, "gru": 787_968}[rnn]
    assert count_trainable(net) == 2 * rnn_params(gates) + 256 * 768 + (256 * 768 + 768) + 2 * 768


def test_counts_do_not_grow_with_depth() -> None:
    shallow = SideNetwork(SideNetworkConfig(rnn="gru", dim=128, d_model=512, n_encoder_layers=6, n_decoder_layers=6))
    deep = SideNetwork(SideNetworkConfig(rnn="gru", dim=128, d_model=512, n_encoder_layers=24, n_decoder_layers=24))
    assert count_trainable(shallow) == count_trainable(deep)


def test_encoder_only_and_probe_counts() -> None:
    minilm = dict(d_model=384, n_encoder_layers=6, n_decoder_layers=0, encoder_only=True, head="linear", num_labels=2)
    net = SideNetwork(SideNetworkConfig(rnn="gru", dim=256, **minilm))
    gru = 3 * (256 * 384 + 256 * 256 + 2 * 256)
    assert count_trainable(net) == 384 + gru + (256 * 384 + 384) + (384 * 2 + 2)
    assert count_trainable(SideNetwork(SideNetworkConfig(rnn="none", **minilm))) == 384 * 2 + 2
    assert count_trainable(SideNetwork(SideNetworkConfig(rnn="none", **T5_BASE))) == 0  # lm head: zero-shot T5


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"dim": 0}, "--dim 0"),
        ({"rnn": "transformer"}, "--rnn"),
        ({"head": "lm", "num_labels": 1}, "--head lm"),
        ({"head": "lm", "encoder_only": True, "n_decoder_layers": 0}, "--head linear"),
    ],
)
def test_bad_configs_are_refused(changes: dict, words: str) -> None:
    with pytest.raises(ReadCacheError, match=words) as e:
        SideNetworkConfig(**{**dict(d_model=8, n_encoder_layers=2, n_decoder_layers=2), **changes})
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# An independent reference: Algorithm 1 token by token, layer by layer, with the cell equations by hand


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + 1e-6) * weight


def cell(kind: str, rnn: torch.nn.Module, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of torch's GRU / LSTM / Elman equations, written out; state = (h, c)."""
    h, c = state
    gi = rnn.weight_ih_l0.double() @ x + rnn.bias_ih_l0.double()
    gh = rnn.weight_hh_l0.double() @ h + rnn.bias_hh_l0.double()
    if kind == "rnn":
        return torch.tanh(gi + gh), c
    if kind == "gru":
        (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3), gh.chunk(3)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, c
    i, f, g, o = (gi + gh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def reference(net: SideNetwork, enc, token_example, n_examples, cross=None, dec=None) -> torch.Tensor:
    cfg, r = net.config, net.config.dim
    enc = enc.double()
    if cfg.rnn == "none":  # the probe: the head reads the frozen states themselves
        return probe_reference(net, enc, token_example, n_examples, dec)
    h_final = []
    for token in range(len(enc)):  # h_E[0] = 0, then one shared cell per encoder layer
        state = (torch.zeros(r, dtype=torch.double), torch.zeros(r, dtype=torch.double))
        for i in range(cfg.n_encoder_layers):
            state = cell(cfg.rnn, net.encoder_rnn, rms(enc[token, i], net.encoder_norm.weight.double()), state)
        h_final.append(state[0])
    up_w, up_b = net.up.weight.double(), net.up.bias.double()
    outputs = []
    for b in range(n_examples):
        tokens = [t for t in range(len(enc)) if token_example[t] == b]
        if cfg.encoder_only:
            adapted = [enc[t, -1] + up_w @ h_final[t] + up_b for t in tokens]
            features = adapted[0] if cfg.pooling == "first" else sum(adapted) / len(adapted)
        else:
            sigma = cross.double().mean(-1) if cross.dim() == 3 else cross.double()
            state = (torch.zeros(r, dtype=torch.double), torch.zeros(r, dtype=torch.double))
            for j in range(cfg.n_decoder_layers):
                psi = sum(sigma[t, j] * (net.psi.weight.double() @ h_final[t]) for t in tokens)
                x = rms(dec[b, j].double(), net.decoder_norm.weight.double()) + psi
                state = cell(cfg.rnn, net.decoder_rnn, x, state)
            features = dec[b, -1].double() + up_w @ state[0] + up_b
        outputs.append(head_reference(net, features))
    return torch.stack(outputs)


def probe_reference(net: SideNetwork, enc, token_example, n_examples, dec) -> torch.Tensor:
    outputs = []
    for b in range(n_examples):
        tokens = [t for t in range(len(enc)) if token_example[t] == b]
        if net.config.encoder_only:
            features = sum(enc[t, -1] for t in tokens) / len(tokens)
        else:
            features = dec[b, -1].double()
        outputs.append(head_reference(net, features))
    return torch.stack(outputs)


def head_reference(net: SideNetwork, features: torch.Tensor) -> torch.Tensor:
    cfg = net.config
    if cfg.head == "lm":
        return cfg.output_scale * net.lm_rows.double() @ features
    out = net.classifier.weight.double() @ features + net.classifier.bias.double()
    return out[0] if cfg.regression else out


def random_inputs(cfg: SideNetworkConfig, lengths: list[int], heads: int | None, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    # Residual streams that grow with depth, as T5's do, so the joiner's normalisation matters.
    growth = torch.arange(1, cfg.n_encoder_layers + 1).view(1, -1, 1)
    states = {
        "enc": torch.randn(total, cfg.n_encoder_layers, cfg.d_model, generator=g) * growth,
        "token_example": torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)),
        "n_examples": len(lengths),
    }
    if not cfg.encoder_only:
        shape = (total, cfg.n_decoder_layers, heads) if heads else (total, cfg.n_decoder_layers)
        states["cross"] = torch.rand(*shape, generator=g)
        states["dec"] = torch.randn(len(lengths), cfg.n_decoder_layers, cfg.d_model, generator=g)
    return states


def randomise(net: SideNetwork, seed: int) -> None:
    """Up starts at zero (no correction); give every parameter a value so every term is checked."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if hasattr(net, "lm_rows"):
            net.lm_rows.copy_(torch.randn(net.lm_rows.shape, generator=g))


CASES = [
    ("gru", {}, None),
    ("lstm", {}, None),
    ("rnn", {}, None),
    ("gru", {}, 3),  # per-head cross-attention, averaged
    ("gru", {"head": "linear", "num_labels": 3}, None),
    ("lstm", {"head": "linear", "num_labels": 1}, None),  # regression
    ("gru", {"encoder_only": True, "n_decoder_layers": 0, "head": "linear", "pooling": "mean"}, None),
    ("rnn", {"encoder_only": True, "n_decoder_layers": 0, "head": "linear", "pooling": "first"}, None),
    ("none", {}, None),
    ("none", {"encoder_only": True, "n_decoder_layers": 0, "head": "linear"}, None),
]


@pytest.mark.parametrize(("rnn", "changes", "heads"), CASES)
def test_forward_matches_a_naive_loop_over_tokens_and_layers(rnn: str, changes: dict, heads: int | None) -> None:
    cfg = SideNetworkConfig(**{**dict(rnn=rnn, dim=6, d_model=8, n_encoder_layers=3, n_decoder_layers=2, output_scale=0.35), **changes})
    net = SideNetwork(cfg)
    randomise(net, seed=1)
    states = random_inputs(cfg, [3, 1, 5], heads, seed=2)
    got = net(**states)
    want = reference(net, **states)
    assert got.shape == want.shape == ((3,) if cfg.regression else (3, cfg.num_labels))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_up_starts_at_zero_so_training_starts_from_the_frozen_output() -> None:
    cfg = SideNetworkConfig(rnn="gru", dim=6, d_model=8, n_encoder_layers=3, n_decoder_layers=2)
    states = random_inputs(cfg, [2, 4], None, seed=0)
    probe = SideNetwork(SideNetworkConfig(**{**cfg.to_dict(), "rnn": "none"}))
    net = SideNetwork(cfg)
    probe.lm_rows.copy_(torch.randn(2, 8))
    net.lm_rows.copy_(probe.lm_rows)
    torch.testing.assert_close(net(**states), probe(**states))


def test_every_parameter_gets_a_gradient() -> None:
    cfg = SideNetworkConfig(rnn="lstm", dim=6, d_model=8, n_encoder_layers=3, n_decoder_layers=2)
    net = SideNetwork(cfg)
    randomise(net, seed=3)
    states = random_inputs(cfg, [2, 3], None, seed=4)
    net.loss(net(**states), torch.tensor([0, 1])).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("encoder_only", [False, True])
def test_bf16_autocast_stays_close_to_fp32(encoder_only: bool) -> None:
    """The bf16 path (CUDA, AMX CPUs) mixes dtypes in index_add_ and the joins; check it on the CPU."""
    changes = {"encoder_only": True, "n_decoder_layers": 0, "head": "linear"} if encoder_only else {}
    cfg = SideNetworkConfig(**{**dict(rnn="gru", dim=16, d_model=32, n_encoder_layers=3, n_decoder_layers=2), **changes})
    net = SideNetwork(cfg)
    randomise(net, seed=5)
    states = random_inputs(cfg, [4, 2, 7], None, seed=6)
    want = net(**states)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = net(**states)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("recurrence", [True, False])
def test_ops_that_follow_the_token_count_see_few_sizes_and_the_real_tokens_are_unchanged(recurrence: bool) -> None:
    """The encoder RNN and Up run over a batch's tokens padded to one of 16 sizes per octave, at most 1/16 more,
    so oneDNN's per-shape kernels stay few (side_network.padded_rows); what the head reads is bit for bit what the
    unpadded computation gives."""
    torch.manual_seed(0)
    net = SideNetwork(SideNetworkConfig(rnn="gru", dim=8, d_model=16, n_encoder_layers=3, n_decoder_layers=0,
                                        encoder_only=True, head="linear", recurrence=recurrence))
    torch.nn.init.normal_(net.up.weight)  # Up starts at zero: make it count
    seen: set[tuple[str, int]] = set()
    with torch.no_grad():
        for tokens in range(1, 4097, 3):
            enc, token_example = torch.randn(tokens, 3, 16), torch.arange(tokens) * 4 // tokens
            alone = pool(enc[:, -1] + net.up(net.encoder_rnn(net.encoder_norm(enc))[0][:, -1]), token_example, 4, "mean")
            hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.add((name, args[0].shape[0]))) for name, m in (("rnn", net.encoder_rnn), ("up", net.up))]
            assert torch.equal(net.features(enc=enc, token_example=token_example, n_examples=4), alone)
            for hook in hooks:
                hook.remove()
            assert tokens <= padded_rows(tokens) <= tokens * 17 / 16
    for name in ("rnn", "up"):
        assert len({n for kind, n in seen if kind == name}) <= 32 + 16 * 7  # 1..31 as they are, then 16 per octave up to 4,096


def test_a_t5_side_network_reads_the_unpadded_corrections() -> None:
    """The T5 path drops the padding before the cross-attention weighting: the same output as without it."""
    torch.manual_seed(0)
    net = SideNetwork(SideNetworkConfig(rnn="gru", dim=8, d_model=16, n_encoder_layers=3, n_decoder_layers=2, head="linear"))
    torch.nn.init.normal_(net.up.weight)
    tokens = 77  # padded to 80
    enc, cross, dec = torch.randn(tokens, 3, 16), torch.rand(tokens, 2), torch.randn(4, 2, 16)
    token_example = torch.arange(tokens) * 4 // tokens
    with torch.no_grad():
        alone = net.decoder_output(net.encoder_rnn(net.encoder_norm(enc))[0][:, -1], cross, token_example, dec)
        assert torch.equal(net.features(enc=enc, token_example=token_example, n_examples=4, cross=cross, dec=dec), alone)
