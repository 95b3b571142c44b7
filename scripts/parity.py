#!/usr/bin/env python
"""Print sdup's max |Δ| against the upstream reference outputs for every module-level fixture.

    python scripts/parity.py [FIXTURES_DIR]      # default: tests/data/fixtures (copies of shared/fixtures)

Each row: the fixture tensor, max |sdup - reference|, scale = max(1, max|reference|), and the ratio
err / scale, which must be <= 1e-5 for a single forward (the project's parity criterion).
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdup  # noqa: E402

torch.set_grad_enabled(False)
rows = []


def row(name, out, ref):
    err = (out.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    rows.append((name, err, scale, err / scale))


def main(fx: Path):
    for fam in ("sd1", "x4", "stablesr"):
        m = sdup.load(fx / fam / "model.ckpt", config=fx / fam / "config.yaml")
        d = load_file(fx / fam / "unet_forward.safetensors")
        feats = {int(k.rsplit(".", 1)[1]): v for k, v in d.items() if k.startswith("in.struct_cond.")} or None
        row(f"{fam}/unet_forward", m.unet(d["in.x"], d["in.timesteps"], d["in.context"], y=d.get("in.y"), features=feats),
            d["out.model_output"])
        v = load_file(fx / fam / "vae.safetensors")
        post = m.vae.encode(v["in.image"])
        row(f"{fam}/vae posterior_mean", post.mean, v["out.posterior_mean"])
        row(f"{fam}/vae posterior_std", post.std, v["out.posterior_std"])
        row(f"{fam}/vae decode", m.vae.decode(v["in.z"]), v["out.decode"])
        t = load_file(fx / fam / "text_encoder.safetensors")
        row(f"{fam}/text_encoder", m.text_encoder(t["in.input_ids"]).context, t["out.last_hidden_state"])
        if fam == "stablesr":
            e = load_file(fx / fam / "time_aware_encoder.safetensors")
            feats = m.struct_encoder(e["in.lr_latent"], e["in.timesteps"])
            for k in (k for k in e if k.startswith("out.feat.")):
                row(f"stablesr/time_aware_encoder {k[4:]}", feats[int(k.rsplit('.', 1)[1])], e[k])
            cfw = sdup.load(fx / fam / "cfw_vae.ckpt")
            c = load_file(fx / fam / "cfw_vae.safetensors")
            post, enc = cfw.vae.encode(c["in.image"])
            row("stablesr/cfw posterior_mean", post.mean, c["out.posterior_mean"])
            for i, f in enumerate(enc[:2]):
                row(f"stablesr/cfw enc_fea.{i}", f, c[f"out.enc_fea.{i}"])
            for w in ("0.0", "0.5", "1.0"):
                row(f"stablesr/cfw decode w={w}", cfw.vae.decode(c["in.z"], enc, w=float(w)), c[f"out.decode_w{w}"])
    x = load_file(fx / "x4" / "conditioning.safetensors")
    m = sdup.load(fx / "x4" / "model.ckpt", config=fx / "x4" / "config.yaml")
    row("x4/conditioning", m.unet(torch.cat([x["in.x"], x["in.x_aug"]], 1), x["in.timesteps"], x["in.context"],
                                  y=x["in.noise_level"]), x["out.model_output"])
    lu = fx / "latent_upscaler"
    if (lu / "diffusers" / "unet").exists():
        try:
            m = sdup.load(lu / "diffusers")
            u = load_file(lu / "unet_forward.safetensors")
            s = u["in.sample"]
            row("latent_upscaler/unet_forward", m.unet(s, u["in.timestep"], u["in.timestep_cond"], u["in.encoder_hidden_states"]),
                u["out.sample"])
            t = load_file(lu / "text_encoder.safetensors")
            o = m.text_encoder(t["in.input_ids"])
            row("latent_upscaler/prompt_embeds (pre-LN)", o.hidden_pre_ln, t["out.prompt_embeds"])
            row("latent_upscaler/pooled", o.pooled, t["out.pooled"])
        except ImportError as e:
            print(f"(latent upscaler skipped: {e})")
    width = max(len(r[0]) for r in rows)
    print(f"{'fixture':{width}s}  {'max|Δ|':>9s}  {'scale':>6s}  {'ratio':>9s}")
    for name, err, scale, ratio in rows:
        print(f"{name:{width}s}  {err:9.2e}  {scale:6.2f}  {ratio:9.2e}{'' if ratio <= 1e-5 else '  FAIL'}")
    return 0 if all(r[3] <= 1e-5 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "tests/data/fixtures"))
