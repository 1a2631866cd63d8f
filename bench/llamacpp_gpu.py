#!/usr/bin/env python3
"""llama.cpp next to moe-offload on the same synthetic weights, on the lent GPU machine.

The GPU machine has no network and takes at most 64 MiB of carried files a call, so the
llama-cpp-python source (an sdist of 76.6 MB) travels trimmed, in parts, and is built there.
Docs: docs/llama-cpp.md, "Running the GPU comparison" (the calls, what each carries, their cost).

Here (PyPI reachable):

    python3 bench/llamacpp_gpu.py pack            # sdist trimmed to 8 MiB + small wheels: .llamacpp-gpu/part-01

On the GPU machine, two calls back to back (it keeps /root only while warm), the first carrying
.llamacpp-gpu/part-01 (not the whole folder: download/ holds the full sdist):

    python3 bench/llamacpp_gpu.py prepare         # store the part; build the CUDA wheel while the GGUF is written
    python3 bench/llamacpp_gpu.py compare         # both backends at 16 and 24 GB, then bench/report.py

``prepare`` stores the carried parts (scripts/vllm_wheelhouse.py's format and code), assembles
them, installs moechat and the plugin into a site folder where they are not installed, then:

- ``build`` (in a child process, also a subcommand): ``pip wheel`` of the sdist with
  ``CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 ..."`` (no build isolation, as
  nothing can be downloaded: the carried scikit-build-core first on the path), the build folder
  kept in /root so a build cut off by the call's time limit goes on in the next call; then
  ``pip install --no-deps --target`` of the wheel;
- meanwhile ``gguf`` (also a subcommand): writes the bf16 checkpoint folder (``python -m
  moechat.backends.fp8_checkpoint --format bf16``, which also writes moechat_synthetic.json),
  converts it with llama.cpp's own convert_hf_to_gguf.py from the sdist (to f16), and once the
  build is in, quantizes that to Q4_0 with ``llama_cpp.llama_model_quantize`` into a folder of
  its own with a copy of moechat_synthetic.json, so ``moechat bench --model THAT_FOLDER``
  extrapolates like the run on the checkpoint folder.

The sdist's converter does not know the demo tokenizer's pre-tokenizer hash (it was trained
here): CONVERTER makes it fall back to llama.cpp's "gpt-2" pre-tokenizer, which is the demo
tokenizer's (byte-level BPE with GPT-2's split regex), and only for such a tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
# Small wheels the image may lack, installed there only where the image cannot import them:
# llama_cpp imports diskcache; the plugin reads GGUF headers with gguf; moechat needs loguru (the
# image has none), platformdirs and pydantic (not known to be there).
EXTRA_WHEELS = ("diskcache==5.6.3", "gguf==0.19.0", "loguru==0.7.3", "platformdirs==4.14.9", "pydantic==2.14.4",
                "annotated-types==0.8.0", "typing-inspection==0.4.5")
# pydantic's compiled half, for the image's CPython 3.12 on x86-64 Linux
BINARY_WHEELS = ("pydantic-core==2.50.5",)
IMAGE_TAGS = ("--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--platform",
              "manylinux2014_x86_64")
# The sdist's build backend (its pyproject asks for scikit-build-core>=0.9.2; the image's version is
# not known here), put first on the build's path: pip builds without isolation, as it cannot download.
BUILD_WHEELS = ("scikit-build-core==1.1.2", "pathspec==1.1.1")
# Parts of the sdist that the wheel's build and the converter never read: its git history (the
# build then records llama.cpp's commit as "unknown"), and vendor/llama.cpp's vocab test files,
# docs, images, benchmarks, CI files and web UI. 73 MiB compressed -> 7.9.
TRIM = (".git", "vendor/llama.cpp/.git", *(f"vendor/llama.cpp/{d}" for d in (
    "models", "docs", "media", "benches", ".github", ".devops", "examples", "tests", "tools/ui")))
RESULTS = ROOT / "bench" / "results"
PACK = ROOT / ".llamacpp-gpu"            # ignored by git; carried part by part
HOME = Path(os.environ.get("LLAMACPP_GPU_HOME", "/root/llamacpp-gpu"))  # on the GPU machine
CUDA_ARGS = ("-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=on -DLLAMA_CURL=off "
             "-DLLAVA_BUILD=off -DLLAMA_BUILD_TESTS=off -DLLAMA_BUILD_EXAMPLES=off")
MODEL = "synthetic:qwen3-next-80b-a3b"
# The folders on the GPU machine, named for what they hold (the report's model column shows them).
HF = HOME / "qwen3-next-80b-a3b-4-of-48-layers-bf16"
GGUF = HOME / "qwen3-next-80b-a3b-4-of-48-layers-gguf"
QUANT_TYPES = ("Q4_0", "Q4_K_M", "Q8_0")  # llama.h's LLAMA_FTYPE_MOSTLY_<type>


def wheelhouse():
    """scripts/vllm_wheelhouse.py (its part/store/assemble code, standard library only)."""
    spec = importlib.util.spec_from_file_location("vllm_wheelhouse", ROOT / "scripts" / "vllm_wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---- here: the parts -------------------------------------------------------------------------------
def trim_sdist(sdist: Path, out: Path, trim: bool = True) -> Path:
    """A copy of the sdist without the vendor folders in TRIM (the same name, so pip builds it alike)."""
    target = out / sdist.name
    skip = tuple(f"{SDIST}/{d}" for d in TRIM) if trim else ()
    with tarfile.open(sdist) as src, tarfile.open(target, "w:gz", compresslevel=9) as dst:
        for member in src:
            if skip and any(member.name == s or member.name.startswith(s + "/") for s in skip):
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return target


def download(out: Path = PACK, sdist: str | None = None) -> Path:
    """The llama-cpp-python sdist in ``out``/download (pip's cache keeps it), unless there already."""
    dl = out / "download"
    dl.mkdir(parents=True, exist_ok=True)
    target = dl / f"{SDIST}.tar.gz"
    if sdist and Path(sdist).resolve() != target.resolve():  # the one already there is taken as it is
        shutil.copy(sdist, target)
    elif not target.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), "--no-binary",
                        ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
    return target


def pack(args: argparse.Namespace) -> None:
    wh = wheelhouse()
    out = Path(args.out)
    sdist = download(out, args.sdist)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(sdist.parent),
                    "--only-binary", ":all:", *EXTRA_WHEELS, *BUILD_WHEELS], check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(sdist.parent),
                    "--only-binary", ":all:", *IMAGE_TAGS, *BINARY_WHEELS], check=True)
    dl = sdist.parent
    files = [trim_sdist(sdist, out, trim=not args.no_trim)]
    files += sorted(dl.glob("*.whl"))
    for old in out.glob("part-*"):
        shutil.rmtree(old)
    tree = wh.tree_bytes()
    part_bytes = int(args.part_mib * wh.MiB)
    if tree + part_bytes + 64 * 1024 > wh.CARRY_LIMIT:
        raise SystemExit(f"The working tree is {tree / wh.MiB:.1f} MiB, so a part of {args.part_mib} MiB would "
                         f"exceed the 64 MiB a call carries: use --part-mib {int((wh.CARRY_LIMIT - tree) / wh.MiB) - 1}.")
    manifest = wh.pack(files, out, part_bytes)
    print(f"{sdist.name}: {sdist.stat().st_size / wh.MiB:.1f} MiB, trimmed {files[0].stat().st_size / wh.MiB:.1f} MiB; "
          f"{len(manifest['parts'])} part(s) (working tree {tree / wh.MiB:.1f} MiB):")
    for name, size in manifest["parts"].items():
        print(f"    {out / name}: {size / wh.MiB:.1f} MiB")


# ---- GPU machine: the build ---------------------------------------------------------------------------
def assemble(args: argparse.Namespace) -> Path:
    wh = wheelhouse()
    files = HOME / "files"
    wh.assemble(Path(args.store), files)
    log(f"assembled {', '.join(sorted(p.name for p in files.iterdir() if p.name != 'manifest.json'))}")
    return files


def source_tree(files: Path) -> Path:
    """The sdist unpacked once, next to it."""
    src = files.parent / "src"
    if not (src / SDIST / "pyproject.toml").exists():
        src.mkdir(parents=True, exist_ok=True)
        with tarfile.open(files / f"{SDIST}.tar.gz") as tar:
            tar.extractall(src, filter="data")
    return src / SDIST


def importable(wheel: Path) -> bool:
    """Whether this Python imports the wheel's package already (the image's, kept as it is;
    pydantic's compiled half goes with pydantic)."""
    module = wheel.name.split("-")[0].lower()
    return importlib.util.find_spec("pydantic" if module == "pydantic_core" else module) is not None


def install_extras(files: Path, target: Path) -> None:
    """The carried small wheels that this Python cannot import yet, into ``target``."""
    extra = [str(p) for p in sorted(files.glob("*.whl")) if not is_build_wheel(p) and not importable(p)]
    if extra:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                        "--target", str(target), *extra], check=True)
        log(f"installed {', '.join(Path(p).name for p in extra)} into {target}")


def is_build_wheel(path: Path) -> bool:
    return any(path.name.startswith(w.split("==")[0].replace("-", "_") + "-") for w in BUILD_WHEELS)


def build(args: argparse.Namespace) -> Path:
    """Build the wheel (CUDA unless --cpu) and install it with --no-deps into --target."""
    files = Path(args.files)
    wheels = HOME / "wheel"
    built = sorted(wheels.glob("llama_cpp_python-*.whl"))
    if not built:
        wheels.mkdir(parents=True, exist_ok=True)
        cmake_args = os.environ.get("CMAKE_ARGS") or ("-DGGML_CUDA=off" if args.cpu else CUDA_ARGS)
        tools = HOME / "buildtools"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                        "--target", str(tools), *(str(p) for p in files.glob("*.whl") if is_build_wheel(p))],
                       check=True)
        env = dict(os.environ, CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 4),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(tools), os.environ.get("PYTHONPATH")])))
        if shutil.which("ninja"):
            env["CMAKE_GENERATOR"] = "Ninja"
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "-w", str(wheels), "--config-settings", f"build-dir={HOME / 'build'}", str(files / f"{SDIST}.tar.gz")]
        log(f"building llama-cpp-python {LLAMA_CPP_PYTHON} (CMAKE_ARGS={cmake_args}), at most {args.timeout} s")
        started = time.monotonic()
        with open(HOME / "build.log", "a") as out:
            # its own process group, so a build cut off takes its compilers with it
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise SystemExit(f"The build did not finish in {args.timeout} s; run `prepare` again in the next call "
                                 f"(it goes on in {HOME / 'build'} while the machine stays warm).") from None
        if rc:
            tail = (HOME / "build.log").read_text(errors="replace").splitlines()[-30:]
            raise SystemExit("pip wheel failed:\n" + "\n".join(tail))
        log(f"built in {time.monotonic() - started:.0f} s")
        built = sorted(wheels.glob("llama_cpp_python-*.whl"))
    target = Path(args.target)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                    "--target", str(target), str(built[-1])], check=True)
    log(f"installed {built[-1].name} into {target}")
    install_extras(files, target)
    return target


def moechat_site() -> list[str]:
    """Paths that make moechat and the llama.cpp plugin importable with their entry points: none
    where they are installed (a checkout's venv); on the GPU machine, a non-editable install of
    both into HOME/site (offline, no dependencies: the image has them), made once."""
    from importlib.metadata import entry_points

    if any(ep.value == "moechat_llamacpp" for ep in entry_points(group="moechat.backends")):
        return []
    site = HOME / "site"
    if not (site / ".installed").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--no-build-isolation", "--upgrade", "--target", str(site), str(ROOT),
                        str(ROOT / "plugins" / "moechat-llamacpp")], check=True)
        (site / ".installed").write_text("ok\n")
    return [str(site)]


def python_path(*first: str) -> dict[str, str]:
    """Puts ``first`` and moechat's site ahead of the rest on this process's path and on its
    children's (PYTHONPATH); returns the environment for a child."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = [p for p in (*first, *moechat_site()) if p and p not in rest]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    if paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(paths + rest)
    return dict(os.environ)


# ---- the GGUF --------------------------------------------------------------------------------------
# Runs llama.cpp's converter unchanged but for one fallback: the demo tokenizer is trained here, so
# its pre-tokenizer hash is unknown to llama.cpp; it is byte-level BPE with GPT-2's split regex, which
# is llama.cpp's "gpt-2" pre-tokenizer. Any other unknown tokenizer still stops the conversion.
CONVERTER = r'''
import json, sys
from pathlib import Path
src = Path(sys.argv[1])
sys.path[:0] = [str(src), str(src / "gguf-py")]
import convert_hf_to_gguf
from conversion import base

known = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        pre = json.loads((Path(self.dir_model) / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt-2"
        raise

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
'''


def convert(hf: Path, out: Path, llama_src: Path, outtype: str = "f16") -> Path:
    """``hf`` (a Hugging Face folder) to a GGUF with llama.cpp's own converter from ``llama_src``
    (a llama.cpp tree: convert_hf_to_gguf.py, conversion/, gguf-py/). Multi-token prediction
    layers are left out (``--no-mtp``; the synthetic checkpoint has none)."""
    cmd = [sys.executable, "-c", CONVERTER, str(llama_src), str(hf), "--outfile", str(out), "--outtype", outtype,
           "--no-mtp"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {hf}:\n" + "\n".join(done.stderr.splitlines()[-20:]))
    return out


def quantize(src: Path, out: Path, qtype: str = "Q4_0") -> Path:
    """``src`` (an f16/bf16 GGUF) to ``qtype`` with llama.cpp's quantizer, through llama-cpp-python."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc:
        raise SystemExit(f"llama_model_quantize({src.name} -> {qtype}) failed with {rc}.")
    return out


def unquantized(hf: Path, folder: Path, llama_src: Path, outtype: str) -> Path:
    """The converter's GGUF of ``hf`` next to ``folder`` (kept until it is quantized)."""
    wide = folder.parent / f"{folder.name}-{outtype}.gguf"
    if not wide.exists():
        started = time.monotonic()
        convert(hf, wide.with_suffix(".partial"), llama_src, outtype)
        wide.with_suffix(".partial").rename(wide)
        log(f"converted {hf.name} to {wide.name} ({wide.stat().st_size / 1e9:.2f} GB) in {time.monotonic() - started:.0f} s")
    return wide


def gguf_folder(hf: Path, folder: Path, llama_src: Path, qtype: str = "Q4_0", outtype: str = "f16") -> Path:
    """``folder``/model-QTYPE.gguf from the checkpoint folder ``hf``, with a copy of its
    moechat_synthetic.json (the depth the benchmark extrapolates from) and tokenizer.json (the
    benchmark's prompt is cut with it, as for the checkpoint)."""
    from moechat.backends import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"model-{qtype}.gguf"
    if not final.exists():
        wide = unquantized(hf, folder, llama_src, outtype)
        started = time.monotonic()
        quantize(wide, final.with_suffix(".partial"), qtype)
        final.with_suffix(".partial").rename(final)
        wide.unlink()
        log(f"quantized to {final.name} ({final.stat().st_size / 1e9:.2f} GB) in {time.monotonic() - started:.0f} s")
    for name in (synthetic.PROVENANCE, "tokenizer.json"):
        if (hf / name).exists():
            shutil.copy(hf / name, folder / name)
    return final


def write_checkpoint(spec: str, hf: Path) -> Path:
    if not (hf / "config.json").exists():
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "moechat.backends.fp8_checkpoint", str(hf), "--format", "bf16",
                        "--model", spec], check=True, env=python_path())
        log(f"wrote {spec} to {hf} in {time.monotonic() - started:.0f} s")
    return hf


def spec_of(args: argparse.Namespace) -> str:
    return f"{args.model}?layers={args.layers}" if args.layers else args.model


def gguf(args: argparse.Namespace) -> Path:
    python_path()
    hf = write_checkpoint(spec_of(args), Path(args.hf))
    return gguf_folder(hf, Path(args.gguf), Path(args.llama_src), args.type, args.outtype)


def prepare(args: argparse.Namespace) -> None:
    """assemble, then the build in a child process while the checkpoint and GGUF are written (the
    converter needs only the sdist's Python; the quantizer waits for the build)."""
    wh = wheelhouse()
    for part in sorted(PACK.glob("part-*")):  # the parts this call carried
        missing = wh.store(part, Path(args.store))
        log(f"stored {part.name}" + (f"; still missing: {', '.join(missing)}" if missing else ""))
    files = assemble(args)
    src = source_tree(files)
    install_extras(files, Path(args.target))  # moechat's own needs first: the checkpoint writer imports it
    python_path(args.target)
    child = subprocess.Popen([sys.executable, __file__, "build", "--files", str(files), "--target", args.target,
                              "--timeout", str(args.timeout)] + (["--cpu"] if args.cpu else []))
    hf = write_checkpoint(spec_of(args), Path(args.hf))
    folder = Path(args.gguf)
    if not (folder / f"model-{args.type}.gguf").exists():  # while the build runs
        unquantized(hf, folder, src / "vendor" / "llama.cpp", args.outtype)
    if child.wait():
        raise SystemExit("The build did not finish (see above); run `prepare` again in the next call.")
    python_path(args.target)
    gguf_folder(hf, folder, src / "vendor" / "llama.cpp", args.type, args.outtype)


# ---- the comparison --------------------------------------------------------------------------------------
def card_name() -> str:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "no-GPU"
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def compare(args: argparse.Namespace) -> Path:
    """``moechat bench`` of both backends at each budget, on the checkpoint folder (moe-offload) and
    the GGUF folder written from it (llama.cpp), one JSON each in one folder; a run stopped by its
    time limit leaves a failure record. Then bench/report.py, unless --no-report."""
    from argparse import Namespace

    env = dict(python_path(args.target), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    from moechat.backends import benchmark
    from moechat.webui.commands.bench import failure_record

    out = Path(args.out) / f"compare-{time.strftime('%Y%m%d-%H%M', time.gmtime())}-{card_name()}-llamacpp"
    out.mkdir(parents=True, exist_ok=True)
    models = {"moe-offload": args.hf, "llama.cpp": args.gguf}
    extra = dict(item.split("=", 1) for item in args.also)  # e.g. vllm on the FP8 checkpoint of the same shapes
    models.update(extra)
    for budget in args.budgets:
        for backend in [*args.backends, *extra]:
            path = out / f"{backend}-{budget:g}gb.json"
            cmd = [sys.executable, "-m", "moechat.webui.cli", "bench", "--backend", backend, "--model", models[backend],
                   "--vram-budget-gb", f"{budget:g}", "--prompt-tokens", str(args.prompt), "--gen-tokens", str(args.gen),
                   "--repeat", str(args.repeat), "--no-progress", "--json", str(path),
                   "--note", "llama.cpp next to moe-offload on one synthetic checkpoint (bench/llamacpp_gpu.py)"]
            cmd += [x for item in args.settings if item.startswith(backend + ":")
                    for x in ("--set", item[len(backend) + 1:])]
            if args.bandwidth_mb is not None:
                cmd += ["--bandwidth-mb", str(args.bandwidth_mb)]
            log(f"== {backend} at {budget:g} GB on {models[backend]}")
            try:
                subprocess.run(cmd, env=env, timeout=args.per_run_s)
            except subprocess.TimeoutExpired:
                log(f"   stopped after {args.per_run_s} s")
                run = Namespace(backend=backend, model=models[backend], layers=None, vram_budget_gb=budget)
                benchmark.write(path, failure_record(run, f"Stopped after {args.per_run_s} s without finishing."))
    if not args.no_report:  # BENCHMARKS.md and the chart from the repository's results; elsewhere, next to them
        where = [] if Path(args.out).resolve() == RESULTS else ["--out", str(out / "BENCHMARKS.md"),
                                                               "--chart", str(out / "chart.png")]
        subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--results", args.out, *where],
                       env=env, check=True)
    log(f"results in {out}")
    back = os.environ.get("OUT")  # the device tool returns what a command leaves under $OUT
    if back:
        shutil.copytree(out, Path(back) / out.name, dirs_exist_ok=True)
        for name in ("BENCHMARKS.md", "bench/chart.png"):
            if Path(args.out).resolve() == RESULTS and (ROOT / name).exists():
                shutil.copy(ROOT / name, Path(back) / Path(name).name)
        log(f"copied to {back}")
    return out


def also_item(text: str) -> str:
    backend, sep, folder = text.partition("=")
    if not (sep and backend and folder):
        raise argparse.ArgumentTypeError(f"{text!r}: give a backend and its model folder, as BACKEND=FOLDER")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: download, trim and split the sdist and small wheels into parts")
    p.add_argument("--out", default=str(PACK))
    p.add_argument("--sdist", default=None, help=f"a {SDIST}.tar.gz already here (else pip downloads it)")
    p.add_argument("--no-trim", action="store_true", help="carry the whole sdist (2 parts)")
    p.add_argument("--part-mib", type=float, default=60.0)

    def gguf_args(q, hf_default: str, gguf_default: str) -> None:
        q.add_argument("--model", default=MODEL, help="the synthetic model (default: the 80 B shapes)")
        q.add_argument("--layers", type=int, default=4, help="its depth (default 4 of 48)")
        q.add_argument("--hf", default=hf_default, help="the bf16 checkpoint folder (written when absent; "
                                                        "name it for other --model or --layers)")
        q.add_argument("--gguf", default=gguf_default, help="the folder for the GGUF")
        q.add_argument("--type", default="Q4_0", choices=QUANT_TYPES)
        q.add_argument("--outtype", default="f16", choices=("f16", "bf16"),
                       help="the converter's output, quantized from (f16 converts several times faster than bf16)")

    d = sub.add_parser("download", help="here: only the sdist (the CPU test converts with its llama.cpp)")
    d.add_argument("--out", default=str(PACK))
    b = sub.add_parser("build", help="GPU machine: build the wheel and install it into --target")
    b.add_argument("--files", default=str(HOME / "files"))
    b.add_argument("--target", default=str(HOME / "py"))
    b.add_argument("--timeout", type=int, default=540)
    b.add_argument("--cpu", action="store_true", help="build for the CPU (a check without a GPU)")
    a = sub.add_parser("assemble", help="GPU machine: join the stored parts")
    a.add_argument("--store", default="/root/llamacpp-parts")
    g = sub.add_parser("gguf", help="write the checkpoint folder, convert and quantize it")
    gguf_args(g, str(HF), str(GGUF))
    g.add_argument("--llama-src", required=True, help="a llama.cpp tree (the sdist's vendor/llama.cpp)")
    r = sub.add_parser("prepare", help="GPU machine: assemble, build (in the background) and gguf")
    gguf_args(r, str(HF), str(GGUF))
    r.add_argument("--store", default="/root/llamacpp-parts")
    r.add_argument("--target", default=str(HOME / "py"))
    r.add_argument("--timeout", type=int, default=480, help="seconds for the build (the quantizer runs after it)")
    r.add_argument("--cpu", action="store_true")
    c = sub.add_parser("compare", help="both backends at each budget, then the report")
    c.add_argument("--hf", default=str(HF))
    c.add_argument("--gguf", default=str(GGUF))
    c.add_argument("--target", default=str(HOME / "py"), help="where `build` installed llama-cpp-python ('' : the env's)")
    c.add_argument("--budgets", type=float, nargs="+", default=[16.0, 24.0])
    c.add_argument("--backends", nargs="+", default=["moe-offload", "llama.cpp"])
    c.add_argument("--prompt", type=int, default=256)
    c.add_argument("--gen", type=int, default=32)
    c.add_argument("--repeat", type=int, default=2)
    c.add_argument("--also", action="append", default=[], metavar="BACKEND=FOLDER", type=also_item,
                   help="one more backend in the same run, on its own folder (e.g. vllm=/root/qwen3-next-fp8)")
    c.add_argument("--per-run-s", type=int, default=130)
    c.add_argument("--bandwidth-mb", type=int, default=None)
    c.add_argument("--set", dest="settings", action="append", default=[], metavar="BACKEND:KEY=VALUE",
                   help="a setting for one backend's runs (repeatable)")
    c.add_argument("--out", default=str(RESULTS))
    c.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    {"download": lambda a: download(Path(a.out)), "pack": pack, "build": build, "assemble": assemble, "gguf": gguf, "prepare": prepare, "compare": compare}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
