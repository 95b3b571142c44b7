"""sdup.load / convert / inspect on the tiny fixture checkpoints: formats, round trips, EMA, errors."""
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import FIXTURES, assert_parity
import sdup
from sdup.checkpoints import CheckpointError, KeyMismatch
from sdup.checkpoints.export import ldm_state_dict, save_diffusers, save_ldm
from sdup.checkpoints.io import read_state_dict

pytestmark = pytest.mark.usefixtures("no_grad")  # forward-only tests (conftest.py)

CKPT = {f: FIXTURES / f / "model.ckpt" for f in ("sd1", "x4")}
YAML = {f: FIXTURES / f / "config.yaml" for f in ("sd1", "x4")}


def load_fixture(fam, **kw):
    return sdup.load(CKPT[fam], config=YAML[fam], **kw)


def same_modules(a, b):
    for comp, m in a.components().items():
        sa, sb = m.state_dict(), getattr(b, comp).state_dict()
        assert sa.keys() == sb.keys(), comp
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp


@pytest.mark.parametrize("fam", ["sd1", "x4"])
def test_load_original_checkpoint_matches_fixtures(fam):
    m = load_fixture(fam)
    assert m.family == fam and m.prediction == {"sd1": "eps", "x4": "v"}[fam]
    assert m.scale_factor == {"sd1": 0.18215, "x4": 0.08333}[fam]
    d = load_file(FIXTURES / fam / "unet_forward.safetensors")
    assert_parity(m.unet(d["in.x"], d["in.timesteps"], d["in.context"], y=d.get("in.y")), d["out.model_output"])
    t = load_file(FIXTURES / fam / "text_encoder.safetensors")
    assert_parity(m.text_encoder(t["in.input_ids"]).context, t["out.last_hidden_state"])
    v = load_file(FIXTURES / fam / "vae.safetensors")
    assert_parity(m.vae.decode(v["in.z"]), v["out.decode"])
    assert "mismatch" not in m.report and sum(m.report["dropped"].values()) > 0


def test_x4_schedule_constants_from_yaml():
    m = load_fixture("x4")
    assert m.schedule == {"linear_start": 0.0001, "linear_end": 0.02, "timesteps": 1000, "max_noise_level": 350,
                          "noise_linear_start": 0.0001, "noise_linear_end": 0.02}


@pytest.mark.parametrize("fam", ["sd1", "x4"])
def test_flat_safetensors_single_file_equals_ckpt(fam, tmp_path):
    sd = read_state_dict(CKPT[fam])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    same_modules(load_fixture(fam), sdup.load(tmp_path / "m.safetensors", config=YAML[fam]))


@pytest.mark.parametrize("fam", ["sd1", "x4"])
def test_diffusers_folder_equals_original(fam):
    a, b = load_fixture(fam), sdup.load(FIXTURES / fam / "diffusers")
    assert b.family == fam
    for comp in b.components():
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert all(torch.allclose(sa[k], sb[k], atol=0, rtol=0) for k in sb), comp


def test_round_trips_are_bit_exact(tmp_path):
    ext = read_state_dict(CKPT["sd1"])
    m = load_fixture("sd1")
    back = ldm_state_dict(m)
    dropped = set(ext) - set(back)
    assert dropped == {k for k in ext if k in sdup.checkpoints.ldm.IGNORED_BUFFERS or k.endswith("position_ids")}
    assert all(torch.equal(back[k], ext[k]) for k in back)
    # original -> sdup file -> original single file -> diffusers folder -> sdup
    sdup.save_sdup(m, tmp_path / "m.sdup.safetensors")
    m2 = sdup.load(tmp_path / "m.sdup.safetensors")
    same_modules(m, m2)
    assert (m2.family, m2.prediction, m2.scale_factor, m2.schedule) == (m.family, m.prediction, m.scale_factor, m.schedule)
    save_ldm(m2, tmp_path / "m.safetensors")
    save_ldm(m2, tmp_path / "m.ckpt")
    for f in ("m.safetensors", "m.ckpt"):
        same_modules(m, sdup.load(tmp_path / f, config=YAML["sd1"]))
    save_diffusers(m2, tmp_path / "folder")
    same_modules(m, sdup.load(tmp_path / "folder"))


@pytest.mark.parametrize("fam", ["sd1", "x4"])
def test_exported_diffusers_folder_runs_in_diffusers(fam, tmp_path):
    from diffusers import UNet2DConditionModel
    m = load_fixture(fam)
    save_diffusers(m, tmp_path / "f")
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "f" / "unet").eval()
    d = load_file(FIXTURES / fam / "unet_forward.safetensors")
    out = ref(d["in.x"], d["in.timesteps"], encoder_hidden_states=d["in.context"], class_labels=d.get("in.y")).sample
    assert_parity(out, d["out.model_output"], what="diffusers UNet on sdup-exported weights")


def test_ema_weights_are_selectable(tmp_path):
    sd = read_state_dict(CKPT["sd1"])
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    full = dict(sd)
    for k in unet_keys:
        full[sdup.checkpoints.ldm.ema_key(k[len("model.diffusion_model."):])] = sd[k] + 1.0
    full["model_ema.decay"], full["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10, dtype=torch.int32)
    torch.save({"state_dict": full, "global_step": 1}, tmp_path / "full-ema.ckpt")
    plain = sdup.load(tmp_path / "full-ema.ckpt", config=YAML["sd1"])
    ema = sdup.load(tmp_path / "full-ema.ckpt", config=YAML["sd1"], ema=True)
    w = "conv_in.weight"
    assert torch.equal(ema.unet.state_dict()[w], plain.unet.state_dict()[w] + 1.0)
    with pytest.raises(CheckpointError, match="no model_ema"):
        load_fixture("sd1", ema=True)


def test_fp16_keeps_vae_fp32():
    m = load_fixture("x4", dtype=torch.float16)
    assert next(m.unet.parameters()).dtype == torch.float16
    assert next(m.vae.parameters()).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ errors

def test_bad_files_give_one_line_errors(tmp_path):
    cases = {}
    (tmp_path / "notes.txt").write_text("hello")
    cases["notes.txt"] = "unsupported file type"
    (tmp_path / "garbage.ckpt").write_bytes(b"\x80\x04garbage" * 10)
    cases["garbage.ckpt"] = "not a loadable checkpoint"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": print}, tmp_path / "objects.ckpt")
    cases["objects.ckpt"] = r"holds Python objects \(print\) besides tensors, which sdup refuses to unpickle"
    good = (FIXTURES / "sd1" / "model.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    cases["truncated.ckpt"] = "truncated or corrupt"
    save_file({"w": torch.zeros(100)}, str(tmp_path / "t.safetensors"))
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[:-100])
    cases["truncated.safetensors"] = "truncated safetensors"
    (tmp_path / "header.safetensors").write_bytes(b"\xff" * 64)
    cases["header.safetensors"] = "not a safetensors file"
    save_file({"some.layer.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    cases["other.safetensors"] = "unsupported checkpoint"
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases["list.pt"] = "not a state dict"
    cases["missing.ckpt"] = "no such file"
    for name, msg in cases.items():
        with pytest.raises(CheckpointError, match=msg) as e:
            sdup.load(tmp_path / name)
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value), name


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = read_state_dict(CKPT["sd1"])
    sd.pop("model.diffusion_model.out.2.bias")
    sd["model.diffusion_model.bogus.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "bad.ckpt")
    with pytest.raises(KeyMismatch, match="missing: out.2.bias") as e:
        sdup.load(tmp_path / "bad.ckpt", config=YAML["sd1"])
    assert "unexpected: bogus.weight" in str(e.value)
    sd = read_state_dict(CKPT["sd1"])
    sd["stray_top_level"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "stray.ckpt")
    with pytest.raises(KeyMismatch, match="stray_top_level"):
        sdup.load(tmp_path / "stray.ckpt", config=YAML["sd1"])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sdup", *map(str, args)], capture_output=True, text=True)


def test_cli_inspect_and_errors(tmp_path):
    r = run_cli("inspect", CKPT["x4"], "--config", YAML["x4"])
    assert r.returncode == 0, r.stderr
    assert "x4 (ldm layout)" in r.stdout and "all consumed" in r.stdout
    r = run_cli("inspect", tmp_path / "nothing.safetensors")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such file" in r.stderr
    (tmp_path / "x.bin").write_bytes(b"not a pickle")
    r = run_cli("convert", tmp_path / "x.bin", tmp_path / "out.safetensors")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error:")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_convert(tmp_path):
    r = run_cli("convert", CKPT["sd1"], tmp_path / "d", "--config", YAML["sd1"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "unet" / "config.json").exists()
    same_modules(load_fixture("sd1"), sdup.load(tmp_path / "d"))


def test_inspect_safetensors_reads_only_the_header(tmp_path, monkeypatch):
    sd = read_state_dict(CKPT["x4"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "x4.safetensors"))
    import safetensors.torch
    from sdup.checkpoints import io
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensor data was read"))
    monkeypatch.setattr(io, "read_state_dict", lambda *a, **k: pytest.fail("tensor data was read"))
    from sdup.checkpoints.loader import inspect
    det, model, err = inspect(tmp_path / "x4.safetensors", config=YAML["x4"])
    assert err is None and det.family == "x4" and "mismatch" not in model.report


def test_load_stablesr_checkpoint_and_cfw_vae(tmp_path):
    fx = FIXTURES / "stablesr"
    m = sdup.load(fx / "model.ckpt", config=fx / "config.yaml")
    assert m.family == "stablesr" and m.struct_encoder is not None and "mismatch" not in m.report
    d = load_file(fx / "time_aware_encoder.safetensors")
    feats = m.struct_encoder(d["in.lr_latent"], d["in.timesteps"])
    for width, ref in ((24, d["out.feat.24"]), (12, d["out.feat.12"])):
        assert_parity(feats[width], ref, what=f"time-aware encoder width {width}")
    u = load_file(fx / "unet_forward.safetensors")
    out = m.unet(u["in.x"], u["in.timesteps"], u["in.context"], features={24: u["in.struct_cond.24"], 12: u["in.struct_cond.12"]})
    assert_parity(out, u["out.model_output"], what="UNet with SFT")
    sdup.save_sdup(m, tmp_path / "s.sdup.safetensors")
    same_modules(m, sdup.load(tmp_path / "s.sdup.safetensors"))
    save_ldm(m, tmp_path / "s.ckpt")
    same_modules(m, sdup.load(tmp_path / "s.ckpt", config=fx / "config.yaml"))

    cfw = sdup.load(fx / "cfw_vae.ckpt")
    assert cfw.family == "stablesr_cfw_vae"
    c = load_file(fx / "cfw_vae.safetensors")
    post, enc = cfw.vae.encode(c["in.image"])
    assert_parity(post.mean, c["out.posterior_mean"])
    assert_parity(cfw.vae.decode(c["in.z"], enc, w=0.5), c["out.decode_w0.5"], what="CFW decode w=0.5")
    with pytest.raises(ValueError, match="no diffusers layout"):
        save_diffusers(cfw, tmp_path / "nope")


def test_diffusers_bin_files_and_fp16_variant(tmp_path):
    import shutil
    src = FIXTURES / "sd1" / "diffusers"
    bin_dir, fp16_dir = tmp_path / "bin", tmp_path / "fp16"
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        sd = load_file(src / comp / f"{stem}.safetensors")
        for d in (bin_dir, fp16_dir):
            (d / comp).mkdir(parents=True)
            shutil.copy(src / comp / "config.json", d / comp / "config.json")
        torch.save(sd, bin_dir / comp / ("pytorch_model.bin" if comp == "text_encoder" else f"{stem}.bin"))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
                  str(fp16_dir / comp / f"{stem}.fp16.safetensors"))
    ref = sdup.load(src)
    same_modules(ref, sdup.load(bin_dir))
    half = sdup.load(fp16_dir, variant="fp16")
    w = half.unet.state_dict()["conv_in.weight"]
    assert torch.equal(w, ref.unet.state_dict()["conv_in.weight"].half().float())
    with pytest.raises(CheckpointError, match="variant 'bf16'"):
        sdup.load(fp16_dir, variant="bf16")


def test_bare_diffusers_vae_folder():
    """A diffusers VAE folder on its own (config.json + weights at the top, like stabilityai/sd-vae-ft-mse) loads
    as family "vae" with the scaling factor of its config, and equals the VAE of the pipeline folder."""
    folder = FIXTURES / "sd1" / "diffusers" / "vae"
    m = sdup.load(folder)
    assert m.family == "vae" and m.unet is None and m.text_encoder is None and m.scale_factor == 0.18215
    ref = sdup.load(FIXTURES / "sd1" / "diffusers").vae.state_dict()
    got = m.vae.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    det, meta, error = sdup.checkpoints.loader.inspect(folder)
    assert det.family == "vae" and error is None and meta.vae is not None


def test_cli_inspect_names_missing_components_and_exits_2(tmp_path):
    """A diffusers folder without vae/: inspect names the absent part and exits 2 (like every user-facing problem)."""
    r = run_cli("convert", CKPT["x4"], tmp_path / "x4", "--config", YAML["x4"])
    assert r.returncode == 0, r.stderr
    shutil.rmtree(tmp_path / "x4" / "vae")
    r = run_cli("inspect", tmp_path / "x4")
    assert r.returncode == 2 and "missing:   vae (listed in model_index.json, not in the folder)" in r.stdout, r.stdout
