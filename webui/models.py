"""Model folders the page offers: folders with a config.json under the models directory, and
snapshots in the Hugging Face cache layout (``models--org--name/snapshots/<rev>/``), and model
files whose endings plugins read (``model_file_suffixes``: ``.gguf``, say).

Reads directory listings only; nothing is downloaded or loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFolder:
    label: str
    path: str


def hf_cache_dir() -> Path | None:
    """The Hugging Face hub cache, as the hub library finds it: $HF_HUB_CACHE, $HF_HOME/hub,
    else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file()


def _snapshots(repo_dir: Path) -> list[Path]:
    """The snapshot of a cached repo: the one ``refs/main`` points at, else the newest."""
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        main = snaps / ref.read_text().strip()
        if _is_model(main):
            return [main]
    found = [p for p in snaps.iterdir() if _is_model(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:1]


def _scan_hf_cache(cache: Path) -> list[ModelFolder]:
    out = []
    for repo in sorted(cache.glob("models--*")):
        name = repo.name.removeprefix("models--").replace("--", "/")
        for snap in _snapshots(repo):
            out.append(ModelFolder(f"{name} (Hugging Face cache)", str(snap)))
    return out


def find_model_folders(models_dir: str | os.PathLike | None, hf_cache: str | os.PathLike | None | bool = True,
                       depth: int = 2, file_suffixes: tuple[str, ...] = ()) -> list[ModelFolder]:
    """Model folders under ``models_dir`` (up to ``depth`` levels down; a folder in the Hugging
    Face cache layout is read as a cache), files there ending in one of ``file_suffixes``, and
    folders in ``hf_cache`` (True: the default cache; a path; False/None: none). Sorted by label;
    unreadable folders are skipped."""
    found: list[ModelFolder] = []
    seen: set[str] = set()

    def add(items: list[ModelFolder]) -> None:
        for item in items:
            if item.path not in seen:
                seen.add(item.path)
                found.append(item)

    if models_dir:
        root = Path(models_dir).expanduser()
        if root.is_dir():
            add(_scan_hf_cache(root))
            level = [root]
            for _ in range(depth):
                nxt = []
                for folder in level:
                    try:
                        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
                    except OSError:
                        continue
                    add([ModelFolder(str(p.relative_to(root)), str(p)) for p in entries
                         if file_suffixes and p.name.lower().endswith(file_suffixes) and p.is_file()])
                    children = [p for p in entries if p.is_dir()]
                    for child in children:
                        if child.name.startswith("models--"):
                            continue
                        if _is_model(child):
                            add([ModelFolder(str(child.relative_to(root)), str(child))])
                        else:
                            nxt.append(child)
                level = nxt
    cache = hf_cache_dir() if hf_cache is True else (Path(hf_cache) if hf_cache else None)
    if cache is not None and cache.is_dir():
        add(_scan_hf_cache(cache))
    return sorted(found, key=lambda m: m.label.lower())


def folder_roots(models_dir: str | os.PathLike | None, allowed: list[str] | tuple[str, ...] = (),
                 operator_model: str | None = None) -> list[Path]:
    """The folders a model may be loaded from on the page: the models directory, the Hugging Face
    cache, the operator's ``--allow-folder`` ones and the operator's own ``--model`` folder."""
    roots = [Path(p).expanduser() for p in (models_dir, *allowed, operator_model) if p]
    cache = hf_cache_dir()
    if cache is not None:
        roots.append(cache)
    return [Path(os.path.realpath(r)) for r in roots]


def folder_refusal(folder: str | None, roots: list[Path]) -> str | None:
    """None when ``folder`` may be loaded (empty: the demo model; a ``synthetic:`` spec; a path in
    one of ``roots``), else the sentence saying why not. It reads no file, so the sentence is the
    same whether the path exists or not."""
    from moechat.backends.synthetic import is_synthetic

    folder = (folder or "").strip()
    if not folder or is_synthetic(folder):
        return None
    real = Path(os.path.realpath(Path(folder).expanduser()))
    if any(real == root or root in real.parents for root in roots):
        return None
    where = ", ".join(str(r) for r in roots) or "no folder"
    return (f"Models can be loaded only from the models folders ({where}). Pick a folder from the list, or ask "
            "the operator to add the folder (moechat serve --models-dir or --allow-folder).")
