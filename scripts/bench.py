#!/usr/bin/env python
"""Benchmark sdup against diffusers on the same random full-size weights, in one run.

    python scripts/bench.py                                   # all default cases, 3 timed runs each, 2 threads
    python scripts/bench.py --models sd14-unet x4-unet --runs 5 --markdown docs/bench.md
    python scripts/bench.py --models sd14-unet --dtype bf16   # both implementations in bf16 (+ sdup fp32 for the ratio)
    python scripts/bench.py --models vae-f4-decode-2048 --memory   # x4 VAE to 2048^2: sdup tiled vs diffusers
    python scripts/bench.py --models sd14-unet --ablation    # + sdup without its CPU fast paths, same run
    python scripts/bench.py --models sd14-unet --compile     # sdup's UNet through torch.compile
    python scripts/bench.py --models x4-unet --dtype bf16 --profile   # + top ops and aten::copy_ of sdup's forward
    python scripts/bench.py --device cuda --dtype fp16 --models x4-unet sd14-unet   # on the GPU (see below)

For each case both implementations get identical weights (diffusers' random init, converted with sdup's key tables),
the outputs are checked to agree, then they are timed **interleaved** (the order rotating each round, after one
warm-up each; median of --runs) under torch.inference_mode with a fixed thread count, so a busy machine slows both alike.
GFLOP/s come from torch's FlopCounterMode on sdup's forward; "ceiling" is the fraction of this CPU's fp32 (or bf16)
matmul rate measured at start (a 4096^2 x 4096^2 torch.mm). --memory measures each implementation's peak RSS during
its forward in a separate process (the peak is reset after building, via /proc/self/clear_refs; diffusers gets an
address-space limit, --mem-limit-gb, so a model that needs hundreds of GiB fails cleanly instead of taking the
machine). sdup runs as scripts/upscale.py runs it (sdup.optimize.prepare): q/k/v fused, bf16 Linears through oneDNN,
small fp32 maps' convs off oneDNN (sdup.nn.Conv2d), its conv weights in --memory-format (auto: sdup.optimize.choose_memory_format:
channels_last for bf16 on CPUs with native bf16, else contiguous; diffusers stays as it is); --ablation adds a
column without the fused q/k/v and the small-map path. --profile: torch.profiler on one more sdup forward per case:
its top ops by self time and one line "aten::copy_: N calls, X MiB" (MiB written by the copies: the activation,
weight and dtype copies the forward makes; the counts do not depend on the machine). Not a test: it needs several GB of RAM and minutes of CPU; run it on demand.

--device cuda: both on the first GPU (built on the CPU, then moved), fp32 / bf16 / fp16 (fp16 only there), each call
timed between torch.cuda.synchronize() calls; "ceiling" is the GPU's measured matmul rate in that dtype (an 8192^2
torch.mm; fp32 matmuls without TF32, while cuDNN's fp32 convolutions use TF32 by default, so fp32 can pass 100%);
sdup prepared for the GPU (no oneDNN Linears; channels_last for half dtypes), attention "auto" (torch's sdpa, as
diffusers), plus a "sdup triton s" column (the same model with sdup's opt-in Triton attention kernel). The outputs must
agree within a tolerance per dtype (relative to diffusers' largest output): a MISMATCH cell and exit status 1
otherwise. No --threads, --memory (peak RSS), --ablation; the tiled 2048^2 VAE case (a CPU design) is skipped.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sdup.checkpoints import diffusers as dfs  # noqa: E402
from sdup.models.unet import UNet  # noqa: E402
from sdup.models.vae import AutoencoderKL  # noqa: E402
from sdup.nn import get_attention_backend, layers, use_attention_backend  # noqa: E402
from sdup.optimize import MEMORY_FORMATS, choose_memory_format, compile_model, cpu_has_native_bf16, prepare  # noqa: E402

CONFIGS = json.loads((ROOT / "tests/data/manifests/diffusers_configs.json").read_text())["configs"]
SD1, X4, X2 = "CompVis/stable-diffusion-v1-4", "stabilityai/stable-diffusion-x4-upscaler", "stabilityai/sd-x2-latent-upscaler"
SD21_UNET = dict(CONFIGS[SD1]["unet"], attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # fp16: --device cuda only
CPU_DTYPES = ("fp32", "bf16")
CUDA_TOLERANCES = {"fp32": 1e-2, "bf16": 1e-1, "fp16": 2e-2}  # max |sdup - diffusers| / max |diffusers|
OPTIONS = {"compile": False, "freeze": False, "ablation": False,  # --compile / --freeze / --ablation /
           "memory_format": "auto", "device": "cpu"}               # --memory-format / --device (set in main / child)


def device() -> torch.device:
    return torch.device(OPTIONS["device"])


def memory_format(dtype) -> str:
    fmt = OPTIONS["memory_format"]
    return choose_memory_format(device(), dtype) if fmt == "auto" else fmt


def prepared(module, dtype):
    """sdup's module as scripts/upscale.py runs it (``sdup.optimize.prepare``: q/k/v fused, bf16 Linears through
    oneDNN, weights in --memory-format), in ``dtype``, compiled with --compile. With --ablation also the plain
    module (unfused, nn.Linear, contiguous, oneDNN for every conv: sdup.nn.Conv2d's small-map path off)."""
    plain = copy.deepcopy(module).to(dtype) if OPTIONS["ablation"] else None
    module = module.to(device(), dtype)
    prepare(module, memory_format(dtype))
    if OPTIONS["compile"]:
        compile_model(module, freeze=OPTIONS["freeze"])
    return module, plain


def without_small_map_convs(fn):
    def run():
        saved, layers.SMALL_MAP_POSITIONS = layers.SMALL_MAP_POSITIONS, -1
        try:
            return fn()
        finally:
            layers.SMALL_MAP_POSITIONS = saved
    return run


def impls(mine, ref, plain, *args, **kwargs):
    """{"sdup": fn, "diffusers": fn[, "sdup plain": fn]} calling each module on the same inputs."""
    fns = {"sdup": lambda: mine(*args, **kwargs), "diffusers": ref}
    if plain is not None:
        fns["sdup plain"] = without_small_map_convs(lambda: plain(*args, **kwargs))
    return fns


def cfg(repo, comp):
    return {k: v for k, v in CONFIGS[repo][comp].items() if not k.startswith("_")}


def unet_case(dcfg, h, w, batch=2, dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel(**dcfg).eval()
    c = dfs.unet_config(dict(ref.config))
    mine = UNet(c).eval()
    mine.load_state_dict(dfs.unet_keymap(c, mine.state_dict()).to_sdup(ref.state_dict()))
    (mine, plain), ref = prepared(mine, dtype), ref.to(device(), dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, h, w, generator=g).to(device(), dtype)
    t = torch.full((batch,), 500, device=device())
    ctx = torch.randn(batch, 77, c.context_dim, generator=g).to(device(), dtype)
    y = torch.full((batch,), 20, device=device()) if c.num_classes else None
    return impls(mine, lambda: ref(x, t, encoder_hidden_states=ctx, class_labels=y).sample, plain, x, t, ctx, y=y)


def kunet_case(h, w, batch=2, dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    from sdup.checkpoints.diffusers import kunet_config, kunet_diffusers_keymap
    from sdup.models.latent_upscaler import KUNet
    ref = UNet2DConditionModel(**cfg(X2, "unet")).eval()
    c = kunet_config(dict(ref.config))
    mine = KUNet(c).eval()
    mine.load_state_dict(kunet_diffusers_keymap(c).to_sdup(ref.state_dict()))
    (mine, plain), ref = prepared(mine, dtype), ref.to(device(), dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 8, h, w, generator=g).to(device(), dtype)
    c_noise = torch.full((batch,), 0.5, device=device())
    cond = torch.randn(batch, 896, generator=g).to(device(), dtype)
    ctx = torch.randn(batch, 77, 768, generator=g).to(device(), dtype)
    return impls(mine, lambda: ref(x, c_noise, encoder_hidden_states=ctx, timestep_cond=cond).sample, plain,
                 x, c_noise, cond, ctx)


def vae_decode_case(repo, h, w, dtype=torch.float32, tiled=False):
    from diffusers import AutoencoderKL as Ref
    ref = Ref(**cfg(repo, "vae")).eval()
    c = dfs.vae_config(dict(ref.config))
    mine = AutoencoderKL(c).eval()
    mine.load_state_dict(dfs.vae_keymap(c, mine.state_dict()).to_sdup(ref.state_dict()))
    mine, ref = mine.to(device(), dtype), ref.to(device(), dtype)
    prepare(mine, memory_format(dtype))
    z = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0)).to(device(), dtype)
    if tiled:  # the only way sdup decodes this size (exact tiling, whole-image GroupNorm statistics)
        from sdup.tiling import tiled_decode
        return {"sdup": lambda: tiled_decode(mine, z, tile=128, overlap=8), "diffusers": lambda: ref.decode(z).sample}
    return {"sdup": lambda: mine.decode(z), "diffusers": lambda: ref.decode(z).sample}


CASES = {  # name: (label, builder(dtype), default)
    "sd14-unet": ("SD 1.4 UNet, 64x64 latent, batch 2", lambda d: unet_case(cfg(SD1, "unet"), 64, 64, dtype=d), True),
    "sd21-unet": ("SD 2.1 UNet, 64x64 latent, batch 2", lambda d: unet_case(SD21_UNET, 64, 64, dtype=d), True),
    "x4-unet": ("x4 UNet, 128x128 latent, batch 2", lambda d: unet_case(cfg(X4, "unet"), 128, 128, dtype=d), True),
    "x2-kunet": ("x2 K-UNet, 128x128 (one CFG step 64->128), batch 2", lambda d: kunet_case(128, 128, dtype=d), True),
    "vae-f8-decode": ("SD VAE decode to 512x512", lambda d: vae_decode_case(SD1, 64, 64, d), True),
    "vae-f4-decode": ("x4 VAE decode to 512x512", lambda d: vae_decode_case(X4, 128, 128, d), True),
    "vae-f4-decode-2048": ("x4 VAE decode to 2048x2048 (sdup tiled)",
                           lambda d: vae_decode_case(X4, 512, 512, tiled=True), False),
}


def matmul_ceiling(dtype, n=4096, runs=3, warmups=1) -> float:
    """GFLOP/s of a large square torch.mm in ``dtype`` on --device (best of ``runs``, after ``warmups``)."""
    a, b = torch.randn(n, n).to(device(), dtype), torch.randn(n, n).to(device(), dtype)
    for _ in range(warmups):
        torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(runs))
    return 2 * n ** 3 / best / 1e9


def cuda_ceilings() -> dict:
    """{dtype name: GFLOP/s} of an 8192^2 torch.mm on the GPU (best of 5 after 3 warm-ups)."""
    return {name: matmul_ceiling(d, n=8192, runs=5, warmups=3) for name, d in DTYPES.items()}


def _sync() -> None:
    if device().type == "cuda":  # kernels run asynchronously: wait for the queued work before and after a call
        torch.cuda.synchronize()


def _time(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def with_attention(fn, backend: str):
    """``fn`` with sdup's attention through ``backend`` instead of the one "auto" picks."""
    def run():
        with use_attention_backend(backend):
            return fn()
    return run


def native_bf16_line(ceilings: dict) -> str:
    ratio = ceilings["bf16"] / ceilings["fp32"]
    verdict = "native" if ratio >= 2 else "not native (emulated or no faster than fp32)"
    flags = "present" if cpu_has_native_bf16() else "absent"
    return (f"bf16 on this CPU: {verdict}: bf16/fp32 matmul ceiling {ratio:.2f} "
            f"(avx512_bf16 / amx_bf16 in /proc/cpuinfo: {flags})")


def interleaved(fns: dict, runs: int) -> dict:
    """Median seconds per callable, timed in turns after one warm-up each; the order rotates every round
    (a, b, b, a, a, b, ... for two) so that neither always runs first."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {k: [] for k in fns}
    for i in range(runs):
        for k in names[i % len(names):] + names[:i % len(names)]:
            times[k].append(_time(fns[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def _slow_conv2d_flops(x_shape, w_shape, kernel_size, bias, stride, padding, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._slow_conv2d_forward`` (sdup.nn.Conv2d's small-map path). torch registers that op with the
    formula of ``aten.convolution``, whose arguments differ (no ``transposed``), and FlopCounterMode then raises."""
    from torch.utils.flop_counter import conv_flop_count
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    mapping = {torch.ops.aten._slow_conv2d_forward: _slow_conv2d_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def profile_forward(fn, top: int = 8) -> tuple[str, str]:
    """(the top ops of one call of ``fn`` by self CPU time, "aten::copy_: N calls, X MiB"): torch.profiler with
    shapes; X = the bytes the copies write (destination numel x element size)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    calls, written = 0, 0
    for event in prof.events():
        if event.name == "aten::copy_":
            calls += 1
            dst_shape, dst_dtype = event.input_shapes[0], event.input_dtypes[0]
            written += math.prod(dst_shape) * ELEMENT_BYTES.get(dst_dtype, 4)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=50)
    return table, f"aten::copy_: {calls} calls, {written / 2 ** 20:.2f} MiB"


ELEMENT_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4, "bool": 1,
                 "unsigned char": 1, "signed char": 1}


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(name: str, impl: str, dtype: str, limit_gb: float) -> None:
    """--memory worker: build the case, drop the other implementation, reset the peak, run one forward, print JSON."""
    torch.set_grad_enabled(False)
    fns = CASES[name][1](DTYPES[dtype])
    fn = fns[impl]
    del fns
    gc.collect()
    if impl == "diffusers" and limit_gb > 0:
        cur = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2 ** 30), cur[1]))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the forward, weights included
    except OSError:
        pass
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            fn()
        result = dict(ok=True, peak=_vm_hwm(), seconds=time.perf_counter() - t0)
    except (MemoryError, RuntimeError) as e:
        result = dict(ok=False, peak=_vm_hwm(), error=str(e).splitlines()[0][:120])
    print("RESULT " + json.dumps(result), flush=True)


def peak_memory(name: str, impl: str, args) -> str:
    cmd = [sys.executable, __file__, "--child", name, impl, "--dtype", args.dtype, "--threads", str(args.threads),
           "--mem-limit-gb", str(args.mem_limit_gb), "--memory-format", args.memory_format] + (["--compile"] if args.compile else []) + (["--freeze"] if args.freeze else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return f"failed (exit {r.returncode})"
    res = json.loads(line[7:])
    gib = res["peak"] / 2 ** 30
    return f"{gib:.2f} GiB" if res["ok"] else f"failed at {gib:.1f} GiB: {res['error']}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[k for k, v in CASES.items() if v[2]], choices=list(CASES))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: both implementations on the first GPU (see the module docstring)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (not set with --device cuda)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="bf16 / fp16 (fp16: cuda only): both in it, plus sdup fp32 for the speed-up (UNet cases)")
    p.add_argument("--compile", action="store_true",
                   help="sdup's UNets through torch.compile (inductor, dynamic shapes); the first call compiles")
    p.add_argument("--freeze", action="store_true",
                   help="with --compile: inductor freezing (weights as constants, pre-packed; static shapes)")
    p.add_argument("--ablation", action="store_true",
                   help="also time sdup without its CPU fast paths (no fused q/k/v, oneDNN for every conv)")
    p.add_argument("--memory-format", choices=["auto", *MEMORY_FORMATS], default="auto",
                   help="sdup's conv weight / activation layout (auto: sdup.optimize.choose_memory_format)")
    p.add_argument("--profile", action="store_true",
                   help="also the top ops and the aten::copy_ calls / MiB of one more sdup forward per case")
    p.add_argument("--memory", action="store_true", help="also peak RSS of each implementation (separate processes)")
    p.add_argument("--mem-limit-gb", type=float, default=12.0, help="address-space limit of the diffusers process")
    p.add_argument("--markdown", "--out", dest="markdown", help="also write the markdown table here")
    p.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.freeze and not args.compile:
        p.error("--freeze only applies with --compile")
    cuda = args.device == "cuda"
    if not cuda and args.dtype not in CPU_DTYPES:
        p.error(f"--dtype {args.dtype} only with --device cuda (CPU: {', '.join(CPU_DTYPES)})")
    if cuda and (args.memory or args.child):
        p.error("--memory measures the peak RSS of CPU runs; not with --device cuda")
    if cuda and args.ablation:
        p.error("--ablation times sdup without its CPU fast paths; not with --device cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if not cuda:
        torch.set_num_threads(args.threads)
    OPTIONS.update(compile=args.compile, freeze=args.freeze, ablation=args.ablation, memory_format=args.memory_format,
                   device=args.device)
    if args.child:
        child(*args.child, args.dtype, args.mem_limit_gb)
        return 0
    dtype = DTYPES[args.dtype]
    half = args.dtype != "fp32"
    compiled = (", sdup compiled (frozen)" if args.freeze else ", sdup compiled") if args.compile else ""
    if cuda:
        ceilings = cuda_ceilings()
        tf32 = f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}"
        head = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}, "
                f"{args.dtype}{compiled}, sdup {memory_format(dtype)}, attention {get_attention_backend()}; "
                f"median of {args.runs} interleaved runs; matmul ceilings (8192^2 torch.mm): "
                + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()) + f" GFLOP/s; {tf32}")
    else:
        ceilings = {name: matmul_ceiling(DTYPES[name]) for name in CPU_DTYPES}
        head = (f"torch {torch.__version__}, {args.threads} threads, {args.dtype}{compiled}, sdup {memory_format(dtype)}, "
                f"CPU; median of {args.runs} interleaved runs; matmul ceilings (4096^2 torch.mm): "
                f"fp32 {ceilings['fp32']:.0f}, bf16 {ceilings['bf16']:.0f} GFLOP/s\n"
                f"{native_bf16_line(ceilings)}")
    ceiling = ceilings[args.dtype]
    cols = ["model", "sdup s", "diffusers s", "sdup/diffusers", "sdup GFLOP/s", "of ceiling", "max abs diff"]
    if half:
        cols.insert(3, "sdup fp32 s")
        cols.insert(4, f"fp32/{args.dtype}")
        cols.append(f"{args.dtype} vs fp32 (of max abs fp32)")
    if cuda:
        cols.insert(3, "sdup triton s")
    if args.ablation:
        cols += ["sdup plain s", "plain/sdup"]
    if args.memory:
        cols += ["sdup peak", "diffusers peak"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    profiles, mismatches = [], []
    print("\n".join(lines), flush=True)
    for name in args.models:
        label, make, _ = CASES[name]
        torch.manual_seed(0)
        tiled = name == "vae-f4-decode-2048"  # tens of minutes per decode: sdup timed once, diffusers in --memory only
        if tiled and cuda:
            print(f"  {name}: skipped (sdup's tiled decode of this case is the CPU design)", flush=True)
            continue
        with torch.inference_mode():
            fns = make(dtype)
            if cuda:
                fns["sdup triton"] = with_attention(fns["sdup"], "triton")
            _sync()
            t0 = time.perf_counter()
            a = fns["sdup"]()
            _sync()
            first = time.perf_counter() - t0
            print(f"  {name}: first sdup call {first:.1f} s", flush=True)
            if tiled:
                t, diff, gflops = {"sdup": first}, "n/a", None
            else:
                diffs = {k: (fn().float() - a.float()).abs().max().item() for k, fn in fns.items() if k != "sdup"}
                diff = f"{diffs['diffusers']:.1e}"
                if cuda:  # relative to diffusers' largest output, against the dtype's tolerance
                    rel = diffs["diffusers"] / fns["diffusers"]().float().abs().max().item()
                    diff += f" ({rel:.1e} rel)"
                    if not rel <= CUDA_TOLERANCES[args.dtype]:
                        diff += " MISMATCH"
                        mismatches.append(name)
                if half:
                    torch.manual_seed(0)
                    fns["sdup fp32"] = make(torch.float32)["sdup"]
                    ref32 = fns["sdup fp32"]().float()
                    err32 = (a.float() - ref32).abs().max().item()
                    diff += f" | {err32:.1e} ({err32 / ref32.abs().max().item():.1%})"
                t = interleaved(fns, args.runs)
                gflops = flops(fns["sdup"]) / 1e9
            if args.profile:
                table, copies = profile_forward(fns["sdup"])
                profiles.append(f"{label}: {copies}")
                print(table + f"\n  {name}: {copies}", flush=True)
        sec = "{:.3g}".format  # 3 significant digits: seconds for a full UNet, milliseconds for a tiny one or a GPU
        row = [label, sec(t['sdup']), sec(t['diffusers']) if "diffusers" in t else "n/a (see peak)"]
        if cuda:
            row += [sec(t['sdup triton'])]
        if half:
            row += [sec(t['sdup fp32']), f"{t['sdup fp32'] / t['sdup']:.2f}"] if "sdup fp32" in t else ["", ""]
        row += [f"{t['sdup'] / t['diffusers']:.2f}" if "diffusers" in t else "",
                f"{gflops / t['sdup']:.3g}" if gflops else "", f"{gflops / t['sdup'] / ceiling:.0%}" if gflops else "", diff]
        if args.ablation:
            row += [f"{t['sdup plain']:.2f}", f"{t['sdup plain'] / t['sdup']:.2f}"] if "sdup plain" in t else ["", ""]
        del fns
        gc.collect()
        if args.memory:
            row += [peak_memory(name, "sdup", args), peak_memory(name, "diffusers", args)]
        line = "| " + " | ".join(row) + " |"
        lines.append(line)
        print(line, flush=True)
    if profiles:
        lines += ["", "sdup's forward under torch.profiler (--profile):", ""] + [f"- {p}" for p in profiles]
        print("\n".join(lines[-len(profiles):]), flush=True)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    if mismatches:
        print(f"outputs disagree beyond the {args.dtype} tolerance ({CUDA_TOLERANCES[args.dtype]:.0e} of max |diffusers|): "
              + ", ".join(mismatches), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
