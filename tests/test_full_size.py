"""Full-size architectures with random weights vs diffusers / transformers (slow: GBs of RAM, minutes).

Run with `python -m pytest -m slow`. The official configs come from tests/data/manifests/diffusers_configs.json.
"""
import json

import pytest
import torch

from helpers import MANIFESTS, assert_parity
from sdup.checkpoints import diffusers as dfs
from sdup.models.unet import UNet
from sdup.models.vae import AutoencoderKL

pytestmark = [pytest.mark.usefixtures("no_grad"), pytest.mark.slow]
CONFIGS = json.loads((MANIFESTS / "diffusers_configs.json").read_text())["configs"]
SD1, X4 = "CompVis/stable-diffusion-v1-4", "stabilityai/stable-diffusion-x4-upscaler"


def diffusers_cfg(repo, comp):
    return {k: v for k, v in CONFIGS[repo][comp].items() if not k.startswith("_")}


@pytest.mark.parametrize("repo", [SD1, X4])
def test_full_size_unet_matches_diffusers(repo):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**diffusers_cfg(repo, "unet")).eval()
    cfg = dfs.unet_config(dict(ref.config))
    unet = UNet(cfg).eval()
    unet.load_state_dict(dfs.unet_keymap(cfg, unet.state_dict()).to_sdup(ref.state_dict()))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 32, 48, generator=g)
    t = torch.tensor([981, 37])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    y = torch.tensor([20, 350]) if cfg.num_classes else None
    expected = ref(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    del ref
    assert_parity(unet(x, t, ctx, y=y), expected, what=repo)


@pytest.mark.parametrize("repo", [SD1, X4])
def test_full_size_vae_matches_diffusers(repo):
    from diffusers import AutoencoderKL as Ref
    torch.manual_seed(0)
    ref = Ref(**diffusers_cfg(repo, "vae")).eval()
    cfg = dfs.vae_config(dict(ref.config))
    vae = AutoencoderKL(cfg).eval()
    vae.load_state_dict(dfs.vae_keymap(cfg, vae.state_dict()).to_sdup(ref.state_dict()))
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 64, 96, generator=g)
    z = torch.randn(2, 4, 16, 24, generator=g)
    assert_parity(vae.encode(img).mean, ref.encode(img).latent_dist.mean, what="encode")
    assert_parity(vae.decode(z), ref.decode(z).sample, what="decode")


@pytest.mark.parametrize("repo", [SD1, X4])
def test_full_size_text_encoder_matches_transformers(repo):
    from transformers import CLIPTextConfig, CLIPTextModel
    from sdup.checkpoints.hf_clip import hf_clip_keymap
    from sdup.checkpoints.folder import hf_text_config
    from sdup.models.text import TextEncoder
    torch.manual_seed(0)
    ref = CLIPTextModel(CLIPTextConfig(**diffusers_cfg(repo, "text_encoder"))).eval()
    hf = {f"text_model.{k}" if not k.startswith("text_model.") else k: v for k, v in ref.state_dict().items()}
    cfg = hf_text_config({k: tuple(v.shape) for k, v in hf.items()}, "sd1" if repo == SD1 else "x4",
                          diffusers_cfg(repo, "text_encoder"))
    enc = TextEncoder(cfg).eval()
    enc.load_state_dict(hf_clip_keymap(cfg).to_sdup(hf, ignore={"text_model.embeddings.position_ids"}.__contains__))
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 49406, 49407, 0
    ids[1, 29] = 49407
    out = ref(ids, output_hidden_states=True)
    mine = enc(ids)
    assert_parity(mine.context, out.last_hidden_state, what="last_hidden_state")
    assert_parity(mine.hidden_pre_ln, out.hidden_states[-1], what="hidden_states[-1]")
