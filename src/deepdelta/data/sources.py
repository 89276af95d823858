"""Document sources: where raw text comes from, one document at a time, in a deterministic order.

A source is cheap to construct (paths resolved, nothing read), gives a ``fingerprint`` that keys the
token cache, ``check``s its input before any tokenising, and yields ``(doc_id, text)`` pairs. The
doc id is stable across machines and runs: the validation split is a hash of it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deepdelta.data.errors import DataError
from deepdelta.data.network import hf_endpoint, hf_offline, honour_hf_offline, url_reachable

SOURCES = ("pysource", "text", "hf", "synthetic")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)

Document = tuple[str, str | bytes]


def _files_digest(root: Path, files: Sequence[Path]) -> str:
    """A digest of names, sizes and mtimes: changes whenever a file is added, removed or edited."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class Source:
    kind: str

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def check(self) -> None:
        """Validate the input (fields exist, hub reachable...) before any tokenising."""

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def num_documents(self) -> int | None:
        return None

    def describe(self) -> str:
        return self.kind


class PySource(Source):
    """The running interpreter's standard library ``.py`` files: real text on every machine, no network."""

    kind = "pysource"

    def __init__(self, include_site_packages: bool = False, max_files: int | None = None, root: str | None = None):
        self.root = Path(root or sysconfig.get_paths()["stdlib"]).resolve()
        self.include_site_packages = bool(include_site_packages)
        self.max_files = None if max_files is None else int(max_files)
        if self.max_files is not None and self.max_files < 1:
            raise DataError(f"max_files must be >= 1 or null, got {max_files}")
        if not self.root.is_dir():
            raise DataError(f"pysource: standard library folder not found: {self.root}")
        self._files: list[tuple[str, Path]] | None = None

    def files(self) -> list[tuple[str, Path]]:
        """Sorted ``(doc_id, path)``: stdlib paths relative to its root, site-packages ones prefixed."""
        if self._files is not None:
            return self._files
        skip = {"__pycache__"} | (set() if self.include_site_packages else {"site-packages", "dist-packages"})
        found = {p.relative_to(self.root).as_posix(): p for p in _walk_py(self.root, skip)}
        if self.include_site_packages:
            site_dirs = {Path(p).resolve() for k in ("purelib", "platlib") if (p := sysconfig.get_paths().get(k))}
            for site in sorted(d for d in site_dirs if d.is_dir() and not d.is_relative_to(self.root)):
                for p in _walk_py(site, {"__pycache__"}):
                    found.setdefault(f"site-packages/{p.relative_to(site).as_posix()}", p)
        files = sorted(found.items())
        if self.max_files is not None:
            files = files[: self.max_files]
        if not files:
            raise DataError(f"pysource: no .py files under {self.root}")
        self._files = files
        return files

    def fingerprint(self) -> dict[str, Any]:
        files = self.files()
        h = hashlib.sha256()
        for doc_id, p in files:
            st = p.stat()
            h.update(f"{doc_id}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {
            "kind": self.kind,
            "root": str(self.root),
            "python": sys.version.split()[0],
            "site_packages": self.include_site_packages,
            "files": len(files),
            "digest": h.hexdigest(),
        }

    def documents(self) -> Iterator[Document]:
        for doc_id, p in self.files():
            yield doc_id, p.read_bytes()  # bytes: the byte tokenizer needs no decode at all

    def num_documents(self) -> int:
        return len(self.files())

    def describe(self) -> str:
        return f"pysource ({self.root}{' + site-packages' if self.include_site_packages else ''})"


def _walk_py(root: Path, skip: set[str]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in filenames:
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _kind_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"  # plain text: each file is one document


class TextSource(Source):
    """The user's files or globs: plain text (one document per file), jsonl/parquet (one per row)."""

    kind = "text"

    def __init__(self, paths: str | Sequence[str] | None, text_field: str = "text"):
        if paths is None or (not isinstance(paths, str) and len(paths) == 0):
            raise DataError("source=text needs `paths`: files, folders or globs, e.g. data.paths=[corpus/*.txt]")
        patterns = [paths] if isinstance(paths, str) else [str(p) for p in paths]
        files: set[Path] = set()
        for pat in patterns:
            pat = os.path.expanduser(pat)
            if glob.has_magic(pat):
                hits = [Path(p) for p in glob.glob(pat, recursive=True) if Path(p).is_file()]
                if not hits:
                    raise DataError(f"source=text: the glob {pat!r} matches no files")
                files.update(hits)
            elif Path(pat).is_dir():
                hits = [p for p in Path(pat).rglob("*") if p.is_file() and not p.name.startswith(".")]
                if not hits:
                    raise DataError(f"source=text: the folder {pat!r} holds no files")
                files.update(hits)
            elif Path(pat).is_file():
                files.add(Path(pat))
            else:
                raise DataError(f"source=text: file not found: {pat!r}")
        self.files = sorted(p.resolve() for p in files)
        self.root = Path(os.path.commonpath([str(p.parent) for p in self.files]))
        self.text_field = str(text_field)

    def _doc_id(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()  # relative: the split survives moving the corpus

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "root": str(self.root),
            "text_field": self.text_field,
            "files": len(self.files),
            "digest": _files_digest(self.root, self.files),
        }

    def check(self) -> None:
        if all(p.stat().st_size == 0 for p in self.files):
            raise DataError(f"source=text: empty corpus: all {len(self.files)} file(s) under {self.root} are empty")
        for path in self.files:
            if _kind_of(path) != "text" and path.stat().st_size > 0:
                fields = _columns(_load_file(path))
                if self.text_field not in fields:
                    raise DataError(
                        f"source=text: text field {self.text_field!r} not found in {path}; "
                        f"its fields are {fields} (set data.text_field)"
                    )

    def documents(self) -> Iterator[Document]:
        plain = [p for p in self.files if _kind_of(p) == "text"]
        if plain:
            import datasets

            # sample_by="document": one row per file, in data_files order, so row i is plain[i].
            ds = datasets.load_dataset(
                "text", data_files=[str(p) for p in plain], sample_by="document", streaming=True, split="train"
            )
            for path, row in zip(plain, ds, strict=True):
                yield self._doc_id(path), row["text"]
        for path in self.files:
            if _kind_of(path) == "text" or path.stat().st_size == 0:
                continue
            doc_id = self._doc_id(path)
            for i, row in enumerate(_load_file(path)):
                text = row.get(self.text_field)
                yield f"{doc_id}#{i}", "" if text is None else str(text)

    def describe(self) -> str:
        return f"text ({len(self.files)} file(s) under {self.root})"


def _load_file(path: Path):
    import datasets

    builder = _kind_of(path)
    return datasets.load_dataset(builder, data_files=[str(path)], streaming=True, split="train")


def _columns(ds) -> list[str]:
    if getattr(ds, "features", None):
        return list(ds.features)
    first = next(iter(ds), None)  # streaming json without declared features: peek one row
    return [] if first is None else list(first)


class HFSource(Source):
    """A Hugging Face dataset by name/config/split (hub, streaming or downloaded) or a ``save_to_disk`` folder."""

    kind = "hf"

    def __init__(
        self,
        name: str | None,
        config: str | None = None,
        split: str = "train",
        streaming: bool = True,
        text_field: str = "text",
        revision: str | None = None,
    ):
        if not name:
            raise DataError("source=hf needs `name`: a hub id (e.g. HuggingFaceFW/fineweb-edu) or a local folder")
        self.name, self.config, self.split = str(name), config, str(split)
        self.streaming, self.text_field, self.revision = bool(streaming), str(text_field), revision
        self.local = Path(os.path.expanduser(self.name))
        self.is_local = self.local.exists()
        self._ds = None

    def _label(self) -> str:
        return f"{self.name!r}" + (f" (config={self.config!r}, split={self.split!r})" if not self.is_local else "")

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"kind": self.kind, "split": self.split, "text_field": self.text_field}
        if self.is_local:
            root = self.local.resolve()
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            fp |= {"path": str(root), "digest": _files_digest(root if root.is_dir() else root.parent, files)}
        else:
            fp |= {"name": self.name, "config": self.config, "revision": self.revision}
        return fp

    def check(self) -> None:
        ds = self._load()
        fields = _columns(ds)
        if self.text_field not in fields:
            raise DataError(
                f"source=hf: text field {self.text_field!r} not found in dataset {self._label()}; "
                f"its fields are {fields} (set data.text_field)"
            )

    def _load(self):
        if self._ds is not None:
            return self._ds
        import datasets

        if self.is_local and any((self.local / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(self.local))
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise DataError(f"source=hf: split {self.split!r} not in {self.name!r}; splits: {list(ds)}")
                ds = ds[self.split]
            self._ds = ds
            return ds
        if not self.is_local and not hf_offline() and not url_reachable(hf_endpoint()):
            raise DataError(
                f"source=hf: cannot reach the Hugging Face Hub ({hf_endpoint()}) to load dataset {self._label()}. "
                "If it is already in your Hugging Face cache, set HF_HUB_OFFLINE=1; otherwise pass a local folder "
                "saved with Dataset.save_to_disk as data.name, or use data=text with local files."
            )
        try:
            with honour_hf_offline():
                self._ds = datasets.load_dataset(
                    self.name, self.config, split=self.split, streaming=self.streaming, revision=self.revision
                )
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError... all fatal here
            hint = (
                "HF_HUB_OFFLINE is set and the dataset is not in the local Hugging Face cache: unset it on a "
                "machine with internet, or pass a local folder saved with Dataset.save_to_disk as data.name."
                if hf_offline()
                else "Check the name/config/split, or pass a local folder saved with Dataset.save_to_disk."
            )
            raise DataError(f"source=hf: could not load dataset {self._label()}: {e}. {hint}") from e
        return self._ds

    def documents(self) -> Iterator[Document]:
        for i, row in enumerate(self._load()):
            text = row.get(self.text_field)
            yield str(i), "" if text is None else str(text)

    def num_documents(self) -> int | None:
        try:
            return len(self._load())
        except TypeError:  # streaming datasets have no length
            return None

    def describe(self) -> str:
        return f"hf {self._label()}"


def make_source(
    source: str,
    *,
    paths: str | Sequence[str] | None = None,
    text_field: str = "text",
    name: str | None = None,
    config: str | None = None,
    split: str = "train",
    streaming: bool = True,
    revision: str | None = None,
    include_site_packages: bool = False,
    max_files: int | None = None,
    root: str | None = None,
) -> Source:
    """Build the document source named ``source`` (synthetic has none: it is generated, not read)."""
    if source == "pysource":
        return PySource(include_site_packages=include_site_packages, max_files=max_files, root=root)
    if source == "text":
        return TextSource(paths, text_field=text_field)
    if source == "hf":
        return HFSource(name, config, split, streaming, text_field, revision)
    raise DataError(f"unknown document source {source!r}; choose one of: pysource, text, hf")
