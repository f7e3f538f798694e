"""What a stage leaves on disk: data, a manifest, figures - always written atomically.

Every write goes to a temporary file in the same folder and is renamed into place, so a killed
kernel leaves either the old file or the new one, never half of one. Long stages keep a
"part" file per unit of work (a configuration, a batch) and skip the units already done when
rerun: :class:`ResumableJsonl`.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from .config import ConfigError

PROVENANCE_PACKAGES = ("almost-utils", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
                       "gguf", "rouge-score", "vllm", "bitsandbytes")


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)        # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"not found: {path} (has the stage that writes it run?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_input_jsonl(path: str | Path, where: str, missing: str = "") -> list[tuple[int, Any]]:
    """``[(line number, parsed line)]`` of a user-supplied JSONL file, blank lines skipped; a
    missing file or a line that is not JSON raises :class:`ConfigError` naming ``where``, the
    file and the line (``missing`` adds a hint to the not-found message)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where}: file not found: {path}{missing}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
    return rows


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def package_versions() -> dict[str, str | None]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class ResumableJsonl:
    """A folder of finished work units, one JSONL file per unit, for resumable stages.

    >>> store = ResumableJsonl(stage_dir / "responses", fingerprint="3f1c...")
    >>> if not store.done("cfgA"):
    ...     store.put("cfgA", rows)          # atomic: all rows of the unit or none
    >>> store.get("cfgA")

    With a ``fingerprint`` (see :mod:`almost_utils.fingerprint`) every row of a unit carries it,
    and a unit written under another fingerprint is never taken for done: it stops the run, so
    units of two recipes are never mixed in one artifact.
    """

    def __init__(self, folder: str | Path, fingerprint: str | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.jsonl"

    def done(self, key: str) -> bool:
        path = self._path(key)
        if not path.is_file():
            return False
        if self.fingerprint is not None:
            with open(path) as fh:
                first = json.loads(fh.readline() or "{}")
            if first.get("fingerprint") != self.fingerprint:
                raise ConfigError(f"{path}: this unit was written under fingerprint {first.get('fingerprint')}, "
                                  f"the run's is {self.fingerprint}; units of two recipes are never mixed "
                                  "(use a new run_name or FRESH=1)")
        return True

    def put(self, key: str, rows: list[dict]) -> None:
        if self.fingerprint is not None:
            rows = [{**r, "fingerprint": self.fingerprint} for r in rows]
        write_jsonl(self._path(key), rows)

    def get(self, key: str) -> list[dict]:
        return read_jsonl(self._path(key))

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.jsonl"))


class Manifest:
    """Provenance of one stage: config, seed, versions, timings and counts.

    Use as a context manager around the stage; it is written (atomically) on success::

        with Manifest(cfg, "comparisons") as man:
            ...
            man.count("pairs", len(pairs))
            with man.timer("sampling"):
                ...
    """

    def __init__(self, cfg, stage: str, fingerprint: str | None = None):
        self.cfg = cfg
        self.stage = stage
        self.path = cfg.stage_dir(stage) / "manifest.json"
        self.data: dict[str, Any] = {
            "stage": stage, "run_name": cfg.run_name, "fingerprint": fingerprint, "seed": cfg.seed,
            "config": cfg.to_dict(), "versions": package_versions(), "timings_s": {}, "counts": {}, "notes": {}}

    def count(self, key: str, value) -> None:
        self.data["counts"][key] = value

    def note(self, key: str, value) -> None:
        self.data["notes"][key] = value

    def set_time(self, key: str, seconds: float) -> None:
        self.data["timings_s"][key] = round(seconds, 3)

    def timer(self, key: str):
        manifest = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                manifest.data["timings_s"][key] = round(
                    manifest.data["timings_s"].get(key, 0.0) + time.perf_counter() - self.t0, 3)

        return _Timer()

    def __enter__(self):
        self._t0 = time.perf_counter()
        self.data["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.data["timings_s"]["total"] = round(time.perf_counter() - self._t0, 3)
            self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json(self.path, self.data)
        return False
