#!/usr/bin/env python3
"""vLLM's wheels for the lent GPU machine, carried in parts under its 64 MiB-a-call limit.

Here (PyPI reachable):

    python3 scripts/vllm_wheelhouse.py build            # download the locked set, split into .whl-vllm/part-NN
    python3 scripts/vllm_wheelhouse.py build --resolve  # resolve anew first and rewrite the lock

On the GPU machine, one call per part (the machine keeps /root between calls only while warm):

    python3 scripts/vllm_wheelhouse.py store .whl-vllm/part-03 /root/vllm-parts
    python3 scripts/vllm_wheelhouse.py assemble /root/vllm-parts /root/vllm-wheels

``build`` resolves vLLM (and moechat's worker needs) for CPython 3.12 on manylinux x86-64 with
pip's own resolver, from package metadata alone (no wheel is downloaded to resolve), against a
stand-in of the GPU image (scripts/gpu-image-packages.txt): its packages of known version count as
installed. What pip would install is carried, except image packages whose version is not known
here, unless a requirement pins them exactly (``==``) or they are named in OPTIONAL; image
packages whose known version a requirement rules out are carried in the version pip chose. Then it downloads those wheels (pip's cache
keeps them), checks their SHA-256 against the index, and packs them into parts of at most
``--part-mib``: whole wheels where they fit, a big wheel cut into pieces. Every part holds a copy of
``manifest.json``; the manifest (format 1) is:

    {"format": 1,
     "files": [{"name": "vllm-...whl", "size": N, "sha256": "...", "group": "core" or "optional",
                "pieces": [{"part": "part-01", "file": "vllm-...whl.000", "size": N, "sha256": "..."}]}],
     "parts": {"part-01": bytes, ...},
     "optional_parts": ["part-08", ...]}      # parts holding only wheels of OPTIONAL, packed last

``store`` copies one part's pieces into the store folder, checking each piece's hash; ``assemble``
joins the pieces of every file, checks each file's hash and writes the wheels (it says which
parts are still missing); ``missing`` prints the core parts not stored yet. ``build`` also writes
.whl-vllm/lock.json (every carried wheel's version, file name and SHA-256). Nothing here needs
more than the standard library, except ``build`` (which needs ``packaging`` and pip).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMAT = 1
MiB = 2**20
CARRY_LIMIT = 64 * MiB  # the device tool's limit on what one call sends: the working tree plus carried paths
DEFAULT_VERSION = "0.26.0"  # the newest vLLM whose wheel pins torch==2.11.0, the image's torch (0.27.0 pins 2.13.0)
WORKER_NEEDS = ["loguru", "pydantic", "platformdirs", "pluggy", "psutil"]  # moechat's own dependencies
IMAGE_LIST = ROOT / "scripts" / "gpu-image-packages.txt"
LOCK = ROOT / "scripts" / "vllm-wheelhouse.lock.json"  # the set measured and committed: versions, files, SHA-256
# Wheels vLLM 0.26.0 requires that a Qwen3-Next (FP8) model on an H100 should never import: vLLM's
# source imports them inside functions of other models' or other GPUs' code paths only (checked in
# the 0.26.0 wheel: no top-level import outside those paths). They go into the last parts
# ("optional"), carried only when a run shows one is needed.
OPTIONAL = {
    "tokenspeed-mla": "MLA attention kernels (DeepSeek-style models)",
    "tokenspeed-triton": "a Triton fork for tokenspeed-mla",
    "tilelang": "TileLang kernels (DeepSeek sparse attention)",
    "z3-solver": "needed by tilelang only",
    "pynvvideocodec": "video input decoding",
    "torchcodec": "audio/video input decoding",
    "humming-kernels": "humming quantized-GEMM kernels (other quantization formats)",
    "nvidia-cuda-nvcc": "humming-kernels[cu13] only (the image has nvcc)",
    "nvidia-nvvm": "nvidia-cuda-nvcc only",
    "nvidia-cuda-crt": "nvidia-cuda-nvcc only",
    "nvidia-cutlass-dsl": "CuTe DSL kernels (Blackwell paths, opt-in GDN cutedsl prefill), imported lazily",
    "nvidia-cutlass-dsl-libs-base": "nvidia-cutlass-dsl only",
    "nvidia-cutlass-dsl-libs-core": "nvidia-cutlass-dsl only",
    "nvidia-cutlass-dsl-libs-cu12": "nvidia-cutlass-dsl only (CUDA 12 build; the image is CUDA 13)",
    "nvidia-cutlass-dsl-libs-cu13": "nvidia-cutlass-dsl only",
    "quack-kernels": "CuTe DSL kernels, imported lazily",
    # vLLM pins numba==0.65.0 but imports numba only for n-gram speculative decoding and one model's
    # processor; the image's numba serves. Carried (with the llvmlite it needs) only if needed.
    "numba": "n-gram speculative decoding only (vLLM pins 0.65.0; the image has its own)",
    "llvmlite": "numba 0.65.0 only",
}

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- the image's packages ------------------------------------------------------------------------
def read_image_list(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """{normalized name: version or None} from lines like ``torch==2.11.0`` or ``jinja2``
    (``pip list --format=freeze`` output works too); # comments and blank lines are skipped."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        out[norm(name)] = version.strip() or None
    return out


# ---- splitting and joining --------------------------------------------------------------------------
def wheel_name(filename: str) -> str:
    return norm(filename.split("-", 1)[0])


def pack(files: list[Path], out: Path, part_bytes: int, optional: set[str] = frozenset()) -> dict:
    """Pack ``files`` into out/part-01, part-02, ... of at most ``part_bytes`` each (the manifest
    copy in each part not counted), cutting a file that does not fit the space left into pieces.
    Wheels named in ``optional`` come last, in parts of their own."""
    if part_bytes < MiB:
        raise SystemExit("A part must be at least 1 MiB.")
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": FORMAT, "files": [], "parts": {}, "optional_parts": []}
    part, used = 1, 0
    core = sorted((f for f in files if wheel_name(f.name) not in optional), key=lambda p: -p.stat().st_size)
    extra = sorted((f for f in files if wheel_name(f.name) in optional), key=lambda p: -p.stat().st_size)

    def part_dir() -> Path:
        d = out / f"part-{part:02d}"
        d.mkdir(exist_ok=True)
        return d

    for path in core + extra:  # biggest first: fewer cuts
        group = "optional" if path in extra else "core"
        if group == "optional" and not manifest["optional_parts"] and used:
            part, used = part + 1, 0
        size = path.stat().st_size
        entry = {"name": path.name, "size": size, "sha256": sha256(path), "group": group, "pieces": []}
        with open(path, "rb") as src:
            left, index = size, 0
            while left or not entry["pieces"]:
                room = part_bytes - used
                if room <= 0 or (left > room and room < MiB):  # a sliver is not worth a piece
                    part, used = part + 1, 0
                    room = part_bytes
                take = min(left, room)
                whole = index == 0 and take == size
                name = path.name if whole else f"{path.name}.{index:03d}"
                target = part_dir() / name
                h = hashlib.sha256()
                with open(target, "wb") as dst:
                    remaining = take
                    while remaining:
                        block = src.read(min(1 << 20, remaining))
                        h.update(block)
                        dst.write(block)
                        remaining -= len(block)
                entry["pieces"].append({"part": target.parent.name, "file": name, "size": take,
                                        "sha256": h.hexdigest()})
                manifest["parts"][target.parent.name] = manifest["parts"].get(target.parent.name, 0) + take
                if group == "optional" and target.parent.name not in manifest["optional_parts"]:
                    manifest["optional_parts"].append(target.parent.name)
                used += take
                left -= take
                index += 1
                if not left:
                    break
        manifest["files"].append(entry)
    text = json.dumps(manifest, indent=1) + "\n"
    for name in manifest["parts"]:
        (out / name / "manifest.json").write_text(text)
    return manifest


def store(part: Path, store_dir: Path) -> list[str]:
    """Copy one part's pieces into ``store_dir`` after checking their hashes; returns the parts
    still missing there."""
    manifest = json.loads((part / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise SystemExit(f"{part}/manifest.json is format {manifest.get('format')}, this script reads {FORMAT}.")
    store_dir.mkdir(parents=True, exist_ok=True)
    for entry in manifest["files"]:
        for piece in entry["pieces"]:
            if piece["part"] != part.name:
                continue
            src = part / piece["file"]
            got = sha256(src)
            if got != piece["sha256"]:
                raise SystemExit(f"{src}: SHA-256 {got} is not the manifest's {piece['sha256']}; rebuild the parts.")
            shutil.copyfile(src, store_dir / piece["file"])
    shutil.copyfile(part / "manifest.json", store_dir / "manifest.json")
    (store_dir / f"{part.name}.stored").write_text("ok\n")
    return missing_parts(store_dir, manifest)


def missing_parts(store_dir: Path, manifest: dict, optional: bool = False) -> list[str]:
    """Parts not stored yet: the core ones, and the optional ones too when ``optional``."""
    return [p for p in sorted(manifest["parts"]) if (optional or p not in manifest.get("optional_parts", []))
            and not (store_dir / f"{p}.stored").exists()]


def assemble(store_dir: Path, wheels: Path) -> dict:
    """Join the stored pieces into ``wheels``, checking every piece and file hash: every core
    wheel (all core parts must be stored), and the optional wheels whose parts are all stored."""
    manifest = json.loads((store_dir / "manifest.json").read_text())
    missing = missing_parts(store_dir, manifest)
    if missing:
        raise SystemExit(f"Parts not stored yet: {', '.join(missing)} (carry each with one call, "
                         "back to back, while the machine stays warm).")
    wheels.mkdir(parents=True, exist_ok=True)
    for entry in manifest["files"]:
        if not all((store_dir / f"{p['part']}.stored").exists() for p in entry["pieces"]):
            continue  # an optional wheel not carried
        target = wheels / entry["name"]
        if target.exists() and target.stat().st_size == entry["size"] and sha256(target) == entry["sha256"]:
            continue
        h = hashlib.sha256()
        with open(target, "wb") as dst:
            for piece in entry["pieces"]:
                data = (store_dir / piece["file"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != piece["sha256"]:
                    raise SystemExit(f"{piece['file']} in {store_dir} is damaged (hash differs); carry "
                                     f"{piece['part']} again.")
                h.update(data)
                dst.write(data)
        if h.hexdigest() != entry["sha256"]:
            target.unlink()
            raise SystemExit(f"{entry['name']}: joined file's SHA-256 differs from the manifest's.")
    (wheels / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---- resolving here ------------------------------------------------------------------------------------
def fake_image_env(folder: Path, image: dict[str, str | None], python: str) -> Path:
    """A venv whose only packages are empty stand-ins (METADATA alone) for the image's packages of
    known version, so pip's resolver takes them as installed and never resolves their own needs
    (torch's CUDA wheels). Returns its interpreter."""
    subprocess.run([python, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = Path(subprocess.run([str(folder / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name, version in image.items():
        if version is None:
            continue
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("image\n")
    return folder / "bin" / "python"


def resolve(roots: list[str], image: dict[str, str | None], env_python: Path) -> tuple[list[dict], list[str]]:
    """pip's own resolver (metadata only, no wheel download) for ``roots``, run by ``env_python``
    (a CPython 3.12 on x86-64 Linux: the GPU image's tags) in a stand-in of the image. Returns
    the distributions to carry and a note for each image package relied on."""
    from packaging.requirements import Requirement

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "--python", str(env_python), "install", "--dry-run",
               "--only-binary=:all:", "--report", str(report), *roots]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PIP_CONSTRAINT="", PIP_FIND_LINKS=""))
        if out.returncode:
            errors = [x for x in (out.stdout + out.stderr).splitlines() if not x.startswith("WARNING: Location")]
            raise SystemExit("pip could not resolve the wheelhouse:\n" + "\n".join(errors[-25:]))
        installs = json.loads(report.read_text())["install"]
    pinned: set[str] = set()
    for dist in installs:
        for r in dist["metadata"].get("requires_dist") or []:
            req = Requirement(r)
            if any(s.operator in ("==", "===") for s in req.specifier):
                pinned.add(norm(req.name))
    carry, notes = [], []
    for dist in installs:
        meta = dist["metadata"]
        name = norm(meta["name"])
        hashes = dist["download_info"].get("archive_info", {}).get("hashes", {})
        entry = {"name": meta["name"], "version": meta["version"],
                 "file": dist["download_info"]["url"].rsplit("/", 1)[1], "sha256": hashes.get("sha256")}
        if name in image:
            if image[name] is None and name not in pinned and name not in OPTIONAL:
                notes.append(f"{name}: the image's (version not known here; pip resolved {meta['version']})")
                continue
            entry["why"] = (f"the image has {image[name]}" if image[name] else "pinned, image version not known")
        carry.append(entry)
    return sorted(carry, key=lambda d: norm(d["name"])), notes


def download(dists: list[dict], folder: Path, env_python: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "--python", str(env_python), "download", "-q", "--no-deps",
           "--only-binary=:all:", "-d", str(folder)]
    subprocess.run(cmd + [f"{d['name']}=={d['version']}" for d in dists], check=True,
                   env=dict(os.environ, PIP_CONSTRAINT="", PIP_FIND_LINKS=""))
    files = []
    for d in dists:
        fname = d["file"]
        path = folder / fname
        if not path.exists():
            raise SystemExit(f"pip did not download {fname}.")
        if d["sha256"] and sha256(path) != d["sha256"]:
            raise SystemExit(f"{fname}: SHA-256 differs from the index's.")
        files.append(path)
    return files


def tree_bytes() -> int:
    """Bytes of what a device call sends besides carried paths: tracked and untracked, not ignored."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def build(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if not args.resolve:
        lock = json.loads(Path(args.lock).read_text())
        if lock["vllm"] != args.vllm:
            raise SystemExit(f"{args.lock} holds vLLM {lock['vllm']}; pass --resolve to build {args.vllm}.")
        out.mkdir(parents=True, exist_ok=True)
        (out / "lock.json").write_text(json.dumps(lock, indent=1) + "\n")
        print(f"{len(lock['dists'])} distributions from {args.lock}; downloading (pip's cache first)...", flush=True)
        shutil.rmtree(out / "image-standin", ignore_errors=True)
        download(lock["dists"], out / "wheels", fake_image_env(out / "image-standin", {}, args.python312))
        repack(out, args.part_mib)
        return
    image = read_image_list(Path(args.image))
    roots = [f"vllm=={args.vllm}", *WORKER_NEEDS]
    print(f"resolving {roots} for CPython 3.12 manylinux x86-64 (metadata only)...", flush=True)
    shutil.rmtree(out / "image-standin", ignore_errors=True)
    env_python = fake_image_env(out / "image-standin", image, args.python312)
    dists, notes = resolve(roots, image, env_python)
    out.mkdir(parents=True, exist_ok=True)
    lock = {"vllm": args.vllm, "dists": dists, "image_relied_on": notes}
    (out / "lock.json").write_text(json.dumps(lock, indent=1) + "\n")
    Path(args.lock).write_text(json.dumps(lock, indent=1) + "\n")
    print(f"wrote {args.lock} (commit it: the next build downloads exactly this set)")
    print(f"{len(dists)} distributions to carry; image packages relied on without a known version:")
    for n in notes:
        print("   ", n)
    download(dists, out / "wheels", env_python)
    repack(out, args.part_mib)


def repack(out: Path, part_mib: float, tree: int | None = None) -> None:
    lock = json.loads((out / "lock.json").read_text())
    files = [out / "wheels" / d["file"] for d in lock["dists"]]
    tree = tree_bytes() if tree is None else tree
    part_bytes = int(part_mib * MiB)
    if tree + part_bytes + 64 * 1024 > CARRY_LIMIT:
        raise SystemExit(f"The working tree is {tree / MiB:.1f} MiB, so a part of {part_mib} MiB would exceed "
                         f"the 64 MiB a call carries: use --part-mib {int((CARRY_LIMIT - tree) / MiB) - 1}.")
    for old in out.glob("part-*"):
        shutil.rmtree(old)
    manifest = pack(files, out, part_bytes, set(OPTIONAL))
    total = sum(f.stat().st_size for f in files)
    opt = sum(f["size"] for f in manifest["files"] if f["group"] == "optional")
    print(f"\n{len(files)} wheels, {total / MiB:.1f} MiB, in {len(manifest['parts'])} parts of at most "
          f"{part_mib} MiB (working tree {tree / MiB:.1f} MiB); core {(total - opt) / MiB:.1f} MiB in "
          f"{len(manifest['parts']) - len(manifest['optional_parts'])} parts, optional {opt / MiB:.1f} MiB in "
          f"{len(manifest['optional_parts'])}:")
    for name, size in manifest["parts"].items():
        print(f"    {out / name}: {size / MiB:.1f} MiB" + (" (optional)" if name in manifest["optional_parts"] else ""))
    biggest = sorted(files, key=lambda p: -p.stat().st_size)[:12]
    print("largest wheels:", ", ".join(f"{p.name} {p.stat().st_size / MiB:.1f} MiB" for p in biggest))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="here: resolve, download and split into parts")
    b.add_argument("--vllm", default=DEFAULT_VERSION)
    b.add_argument("--out", default=str(ROOT / ".whl-vllm"))
    b.add_argument("--image", default=str(IMAGE_LIST), help="the GPU image's packages (name or name==version a line)")
    b.add_argument("--resolve", action="store_true",
                   help="resolve anew (PyPI metadata) and rewrite --lock; default: download what --lock lists")
    b.add_argument("--lock", default=str(LOCK))
    b.add_argument("--part-mib", type=float, default=60.0)
    b.add_argument("--python312", default=shutil.which("python3.12") or "python3.12",
                   help="a Python 3.12 here, for the stand-in of the image that pip resolves against")
    p = sub.add_parser("pack", help="here: split the downloaded wheels into parts again (no download)")
    p.add_argument("--out", default=str(ROOT / ".whl-vllm"))
    p.add_argument("--part-mib", type=float, default=60.0)
    s = sub.add_parser("store", help="GPU machine: check one carried part and copy it into the store")
    s.add_argument("part")
    s.add_argument("store")
    m = sub.add_parser("missing", help="GPU machine: print the core parts not stored yet (nothing: all are)")
    m.add_argument("store")
    a = sub.add_parser("assemble", help="GPU machine: join the stored pieces into wheels")
    a.add_argument("store")
    a.add_argument("wheels")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        build(args)
    elif args.cmd == "pack":
        repack(Path(args.out), args.part_mib)
    elif args.cmd == "store":
        missing = store(Path(args.part), Path(args.store))
        print(f"stored {Path(args.part).name}; " + (f"still missing: {', '.join(missing)}" if missing else
                                                    "every part is stored"))
    elif args.cmd == "missing":
        store_dir = Path(args.store)
        print(" ".join(missing_parts(store_dir, json.loads((store_dir / "manifest.json").read_text()))))
    else:
        manifest = assemble(Path(args.store), Path(args.wheels))
        print(f"assembled {len(manifest['files'])} wheels in {args.wheels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
