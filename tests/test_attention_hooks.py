"""Attention hooks (sdup.nn.hooks): layer names, reading and editing the probabilities, runs without hooks unchanged bit
for bit, every attention the models use (LDM UNet, K-UNet with its text bias, VAE mid block, StableSR's time-aware
encoder), the latent tiles of ``TiledModel``, gradients through an edit."""
import functools
import importlib

import pytest
import torch
from safetensors.torch import load_file

import sdup
from helpers import FIXTURES, FORWARD_TOL, assert_parity
from sdup.nn import AttentionOutput, attention_hooks, attention_layers, use_attention_backend
from sdup.pipelines.x4 import x4_network
from sdup.tiling import TiledModel

A = importlib.import_module("sdup.nn.attention")  # the module (sdup.nn.attention is also the function's name)
pytestmark = [pytest.mark.usefixtures("no_grad", "one_thread")]


@functools.lru_cache(maxsize=None)
def load(family):
    folder = {"x2": "latent_upscaler"}.get(family, family)
    if family == "x2":
        return sdup.load(FIXTURES / folder / "diffusers")
    return sdup.load(FIXTURES / folder / "model.ckpt", config=FIXTURES / folder / "config.yaml")


def sd1_inputs():
    return load_file(FIXTURES / "sd1" / "unet_forward.safetensors")


def sd1_unet_run(model=None):
    d = sd1_inputs()
    return (model or load("sd1")).unet(d["in.x"], d["in.timesteps"], d["in.context"])


def recorder(store):
    def fn(name, q, k, v, probs):
        store.setdefault(name, []).append(probs.clone())
    return fn


# ------------------------------------------------------------------------------------------------
# names


def test_layer_names_follow_the_module_tree():
    names = list(attention_layers(load("sd1")))
    assert "unet.mid.attn.blocks.0.attn2" in names and "vae.decoder.mid.attn" in names
    assert all(n.startswith(("unet.", "vae.")) for n in names)  # the text encoder's attention is open_clip's
    for name, module in attention_layers(load("sd1")).items():  # the same names as the module tree
        comp, rest = name.split(".", 1)
        assert getattr(load("sd1"), comp).get_submodule(rest) is module
    assert list(attention_layers(load("sd1").unet)) == [n[len("unet."):] for n in names if n.startswith("unet.")]
    assert "struct_encoder.mid.attn" in attention_layers(load("stablesr"))
    assert {n.rsplit(".", 1)[1] for n in attention_layers(load("x2"))} == {"self_attn", "cross_attn"}


def test_unknown_pattern_names_the_nearest_layers():
    with pytest.raises(ValueError, match=r"no attention layer matches 'unet.up.9.\*'; nearest: unet\.") as err:
        with attention_hooks(load("sd1"), {"unet.up.9.*": print}):
            pass
    assert "attention_layers(model)" in str(err.value)
    with pytest.raises(TypeError, match="not a callable"):
        with attention_hooks(load("sd1"), {"unet.*": "probs"}):
            pass
    assert not A._hooks  # nothing left attached


def test_glob_patterns_select_layers():
    seen = {}
    with attention_hooks(load("sd1"), {"unet.*.attn2": recorder(seen)}):
        sd1_unet_run()
    expected = [n for n in attention_layers(load("sd1")) if n.startswith("unet.") and n.endswith("attn2")]
    assert sorted(seen) == sorted(expected) and len(expected) > 1
    assert not A._hooks


# ------------------------------------------------------------------------------------------------
# without hooks: unchanged bit for bit


def test_runs_without_hooks_are_bit_identical():
    ref = sd1_unet_run()
    with attention_hooks(load("sd1"), {}):
        assert torch.equal(sd1_unet_run(), ref)
    with attention_hooks(load("x4"), {"unet.*": recorder({})}):  # hooks on another model's layers
        assert torch.equal(sd1_unet_run(), ref)
    assert torch.equal(sd1_unet_run(), ref)


@pytest.mark.parametrize("backend", ["sdpa", "math", "chunked"])
def test_hooks_under_every_backend(backend):
    """Whatever backend is selected: no hooks = that backend bit for bit; hooked layers read rows that sum to 1."""
    seen = {}
    with use_attention_backend(backend, chunk_size=64):  # 16x24 = 384 tokens -> 6 chunks
        ref = sd1_unet_run()
        with attention_hooks(load("sd1"), {}):
            assert torch.equal(sd1_unet_run(), ref)
        with attention_hooks(load("sd1"), {"unet.*": recorder(seen)}):
            assert_parity(sd1_unet_run(), ref, FORWARD_TOL, what=f"read-only hooks under {backend}")
    assert len(seen) == sum(n.startswith("unet.") for n in attention_layers(load("sd1")))
    for (probs,) in seen.values():
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


def test_only_hooked_layers_leave_their_backend(monkeypatch):
    """One hooked layer runs the math path; every other one still calls sdpa."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    unet_layers = [n for n in attention_layers(load("sd1")) if n.startswith("unet.")]
    sd1_unet_run()
    assert len(calls) == len(unet_layers)
    calls.clear()
    with attention_hooks(load("sd1"), {unet_layers[0]: recorder({})}):
        sd1_unet_run()
    assert len(calls) == len(unet_layers) - 1


# ------------------------------------------------------------------------------------------------
# reading and editing


def test_reading_probabilities():
    seen = {}
    with attention_hooks(load("sd1"), {"unet.*": recorder(seen)}):
        sd1_unet_run()
    heads = load("sd1").unet.cfg.num_heads
    for name, (probs,) in seen.items():
        module = attention_layers(load("sd1"))[name]
        assert probs.dtype == torch.float32 and probs.shape[:2] == (2, heads)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        if name.endswith("attn2"):  # cross-attention: a row over the 77 text tokens
            assert probs.shape[-1] == 77 and module.heads == heads
        else:
            assert probs.shape[-1] == probs.shape[-2]  # self-attention: every position


def test_unchanged_probabilities_reproduce_the_output():
    """Hooks that return the probabilities they got: the math backend bit for bit, sdpa within the forward tolerance."""
    ref = sd1_unet_run()
    with use_attention_backend("math"):
        ref_math = sd1_unet_run()
    with attention_hooks(load("sd1"), {"unet.*": lambda name, q, k, v, probs: probs}):
        out = sd1_unet_run()
    assert torch.equal(out, ref_math)
    assert_parity(out, ref, FORWARD_TOL, what="hooked math path vs sdpa")


def test_editing_probabilities_and_outputs():
    ref = sd1_unet_run()

    def drop_token(name, q, k, v, probs):  # prompt-to-prompt style: token 1 gets no attention, rows renormalised
        probs = probs.clone()
        probs[..., 1] = 0
        return probs / probs.sum(-1, keepdim=True)

    with attention_hooks(load("sd1"), {"unet.*.attn2": drop_token}):
        assert (sd1_unet_run() - ref).abs().max() > 1e-4
    with attention_hooks(load("sd1"), {"unet.*.attn2": lambda name, q, k, v, p: AttentionOutput(p @ v)}):
        assert_parity(sd1_unet_run(), ref, FORWARD_TOL, what="AttentionOutput(probs @ v)")
    with attention_hooks(load("sd1"), {"unet.mid.*.attn2": lambda n, q, k, v, p: AttentionOutput(v[..., :1, :])}):
        with pytest.raises(ValueError, match="AttentionOutput of shape"):
            sd1_unet_run()
    with attention_hooks(load("sd1"), {"unet.mid.*.attn2": lambda name, q, k, v, p: p[..., :5]}):
        with pytest.raises(ValueError, match=r"returned \(2, 2, \d+, 5\)"):
            sd1_unet_run()


def test_hooks_chain_in_order_and_nest():
    order = []

    def tag(label):
        def fn(name, q, k, v, probs):
            order.append(label)
            return probs * 2 if label == "outer" else None
        return fn

    layer = "unet.mid.attn.blocks.0.attn2"
    with attention_hooks(load("sd1"), {layer: tag("outer")}):
        with attention_hooks(load("sd1"), {"unet.mid.*attn2": tag("inner")}):
            sd1_unet_run()
        assert len(A._hooks) == 1
    assert order == ["outer", "inner"] and not A._hooks


def test_gradients_flow_through_an_edit():
    """A learnable gain on one token's attention gets a gradient (hooks run inside autograd)."""
    gain = torch.ones((), requires_grad=True)

    def scale_token(name, q, k, v, probs):
        probs = torch.cat([probs[..., :1], probs[..., 1:2] * gain, probs[..., 2:]], -1)
        return probs / probs.sum(-1, keepdim=True)

    with torch.enable_grad(), attention_hooks(load("sd1"), {"unet.*.attn2": scale_token}):
        sd1_unet_run().square().mean().backward()
    assert gain.grad is not None and torch.isfinite(gain.grad) and gain.grad != 0


# ------------------------------------------------------------------------------------------------
# every attention the models use


def test_vae_mid_attention():
    vae, seen = load("sd1").vae, {}
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    ref = vae.decode(z)
    with attention_hooks(load("sd1"), {"vae.decoder.mid.attn": recorder(seen)}):
        assert_parity(vae.decode(z), ref, FORWARD_TOL, what="hooked VAE mid attention")
    (probs,) = seen["vae.decoder.mid.attn"]
    assert probs.shape == (1, 1, 48, 48)  # one head over the 6 x 8 latent positions


def test_kunet_text_bias_reaches_the_probabilities():
    """x2 K-UNet: the padding tokens' -10000 bias is in the probabilities the hook gets; editing changes the output."""
    unet, seen = load("x2").unet, {}
    d = load_file(FIXTURES / "latent_upscaler" / "unet_forward.safetensors")
    args = d["in.sample"], d["in.timestep"], d["in.timestep_cond"], d["in.encoder_hidden_states"]
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[:, :5] = True
    ref = unet(*args, context_mask=mask)
    with attention_hooks(load("x2"), {"unet.*": recorder(seen)}):
        assert_parity(unet(*args, context_mask=mask), ref, FORWARD_TOL, what="hooked K-UNet")
    cross = [p for n, (p,) in seen.items() if n.endswith("cross_attn")]
    assert cross and all(p.shape[-1] == 77 and float(p[..., 5:].max()) < 1e-6 for p in cross)
    assert any(n.endswith("self_attn") for n in seen)
    with attention_hooks(load("x2"), {"unet.*.cross_attn": lambda n, q, k, v, p: torch.roll(p, 1, -1)}):
        assert (unet(*args, context_mask=mask) - ref).abs().max() > 1e-4


def test_stablesr_time_aware_encoder():
    enc, seen = load("stablesr").struct_encoder, {}
    d = load_file(FIXTURES / "stablesr" / "time_aware_encoder.safetensors")
    ref = enc(d["in.lr_latent"], d["in.timesteps"])
    with attention_hooks(load("stablesr"), {"struct_encoder.*": recorder(seen)}):
        out = enc(d["in.lr_latent"], d["in.timesteps"])
    assert sorted(seen) == sorted(n for n in attention_layers(load("stablesr")) if n.startswith("struct_encoder."))
    for w in ref:
        assert_parity(out[w], ref[w], FORWARD_TOL, what=f"hooked time-aware encoder, width {w}")


# ------------------------------------------------------------------------------------------------
# tiled runs


def test_hooks_fire_per_latent_tile():
    """Under TiledModel a hook is called once per tile, with that tile's tokens."""
    model = load("x4")
    net = x4_network(model.unet)
    g = torch.Generator().manual_seed(0)
    x, x_aug = torch.randn(1, 4, 16, 24, generator=g), torch.rand(1, 3, 16, 24, generator=g)
    args = dict(context=torch.randn(1, 77, 32, generator=g), concat=x_aug, y=torch.tensor([20]))
    layer, whole, tiles = "unet.mid.attn.blocks.0.attn2", {}, {}
    with attention_hooks(model, {layer: recorder(whole)}):
        net(x, torch.tensor([500]), **args)
    tiled = TiledModel(net, tile=8, overlap=4)
    th, tw, grid = tiled.grid(16, 24)
    with attention_hooks(model, {layer: recorder(tiles)}):
        tiled(x, torch.tensor([500]), **args)
    per_position = whole[layer][0].shape[-2] / (16 * 24)  # query tokens per latent px at that level
    assert len(grid) > 1 and len(tiles[layer]) == len(grid)
    assert all(p.shape[-2] == per_position * th * tw and p.shape[-1] == 77 for p in tiles[layer])
