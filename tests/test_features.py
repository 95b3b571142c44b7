"""Features at every block (docs/research.md): torch forward hooks on sdup's modules, found by the names of the key
tables in docs/keymaps, fire on the tiled paths too: once per latent tile under ``TiledModel``, once per VAE tile
(a crop with its halo) for the decoder's modules after the mid block in ``tiled_decode``, and the hooks change
nothing."""
import functools

import pytest
import torch

import sdup
from helpers import FIXTURES
from sdup.pipelines.x4 import x4_network
from sdup.tiling import TiledModel, tiled_decode

pytestmark = [pytest.mark.usefixtures("no_grad", "one_thread")]
H, W = 16, 24


@functools.lru_cache(maxsize=None)
def x4():
    return sdup.load(FIXTURES / "x4" / "model.ckpt", config=FIXTURES / "x4" / "config.yaml")


class Recorder:
    """Forward hooks on named submodules of ``root``: the output shape of every call, per name."""

    def __init__(self, root, names):
        self.shapes = {n: [] for n in names}
        self.handles = [root.get_submodule(n).register_forward_hook(functools.partial(self.hook, n)) for n in names]

    def hook(self, name, module, inputs, output):
        self.shapes[name].append(tuple(output.shape))

    def remove(self):
        for h in self.handles:
            h.remove()


def test_module_names_are_the_key_table_names():
    """The sdup column of the key tables (``model.keymaps``, docs/keymaps) names parameters of named modules:
    ``unet.down.1.attn.0.blocks.0.attn2.q_proj.weight`` is a parameter of ``model.unet.get_submodule(...)``."""
    for comp in ("unet", "vae"):
        modules = {f"{comp}.{n}" if n else comp for n, _ in getattr(x4(), comp).named_modules()}
        keys = x4().keymaps[comp].sdup_keys()
        assert keys and all(k.rsplit(".", 1)[0] in modules for k in keys), comp
    assert "unet.down.1.attn.0.blocks.0.attn2.q_proj.weight" in x4().keymaps["unet"].sdup_keys()


def test_forward_hooks_fire_per_latent_tile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, H, W, generator=g)
    cond = dict(context=torch.randn(1, 77, 32, generator=g), concat=torch.rand(1, 3, H, W, generator=g),
                y=torch.tensor([20]))
    net, t = x4_network(x4().unet), torch.tensor([500])
    rec = Recorder(x4().unet, ["up.0.res.0", "conv_out"])
    try:
        ref = net(x, t, **cond)
        assert rec.shapes["conv_out"] == [(1, 4, H, W)]
        rec.shapes = {n: [] for n in rec.shapes}
        tiled = TiledModel(net, tile=8, overlap=4)
        th, tw, grid = tiled.grid(H, W)
        tiled(x, t, **cond)
    finally:
        rec.remove()
    assert len(grid) > 1 and all(len(s) == len(grid) for s in rec.shapes.values())
    assert set(rec.shapes["conv_out"]) == {(1, 4, th, tw)}
    assert ref.shape == (1, 4, H, W)


def test_forward_hooks_fire_per_vae_tile():
    vae = x4().vae
    z = torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(1))
    info, plain = {}, tiled_decode(vae, z, tile=8, overlap=4)
    names = ["decoder.mid", "decoder.up.0.res.0", "decoder.up.1.res.1.conv1", "decoder.conv_out"]
    rec = Recorder(vae, names)
    try:
        out = tiled_decode(vae, z, tile=8, overlap=4, info=info)
    finally:
        rec.remove()
    assert torch.equal(out, plain)  # read-only hooks change nothing
    assert rec.shapes["decoder.mid"] == [(1, 32, H, W)]  # the mid block runs on the whole latent
    for name in names[1:]:  # every later module on each tile: a crop with its halo, smaller than the map
        assert len(rec.shapes[name]) == info["tiles"] > 1, name
    full = {"decoder.up.0.res.0": (H, W), "decoder.up.1.res.1.conv1": (2 * H, 2 * W),
            "decoder.conv_out": (4 * H, 4 * W)}
    for name, (h, w) in full.items():
        assert all(s[-2] < h or s[-1] < w for s in rec.shapes[name]), name
