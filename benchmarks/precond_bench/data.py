"""Real data that ships inside packages, prepared once into ``<data_dir>``.

- **Python documentation** (language modelling): the reStructuredText sources of the Python 3.11
  documentation, from Debian's ``python3.11-doc`` package (``usr/share/doc/python3.11/html/_sources``,
  497 documents, ~11 MB of English prose and code; Python Software Foundation License). Byte-level
  tokens; documents are split into train / validation by a hash of their path, so no document is in both.
- **Linux kernel C source** (the GPU language-modelling workload): the ``.c`` and ``.h`` files of Linux 6.1
  from Debian's ``linux-source-6.1`` package (``usr/src/linux-source-6.1.tar.xz``, a 139 MB package; GPL-2.0
  with the kernel's syscall note, per the package's copyright file). The generated AMD register headers
  (``asic_reg/``, 400 MB of ``#define`` tables) are left out. A file is kept when the hash of its path falls
  in the first 36% of the hash range, the first 0.5% of which goes to validation: ~270 MB of training
  bytes, so a budget of a few hundred million tokens never repeats data.
- **Digits** (vision): scikit-learn's copy of the UCI optical-recognition digits (1,797 8×8 images,
  10 classes; BSD-3-Clause), read from ``sklearn/datasets/data/digits.csv.gz`` inside the scikit-learn
  wheel (downloaded with ``pip download``, not installed).

Nothing is fetched at training time: ``prepare_*`` fetch by package name (apt / pip) if the prepared files
are missing, which needs those registries once; copy ``<data_dir>`` to machines that have none. A prepared
``train.bin`` may travel compressed as ``train.bin.xz`` (likewise ``val.bin``): it is decompressed beside
itself on first use.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["default_data_dir", "prepare_corpus", "split_documents", "load_corpus", "prepare_digits", "load_digits",
           "CORPORA", "SKLEARN_VERSION"]

logger = logging.getLogger(__name__)

SKLEARN_VERSION = "1.9.1"


def default_data_dir() -> str:
    """Where the benchmark and its studies look for prepared data unless told: ``$PRECOND_DATA``, else ``data``."""
    return os.environ.get("PRECOND_DATA", "data")


def _path_hash(name: str) -> float:
    """A number in [0, 1] fixed by the name (the same on every machine)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_documents(docs: dict[str, bytes], fraction: float = 0.1) -> tuple[bytes, bytes]:
    """Concatenate documents into (train, validation) byte strings; a document goes to validation when the
    hash of its name falls in the first ``fraction`` of the hash range (stable across machines)."""
    train, val = [], []
    for name in sorted(docs):
        (val if _path_hash(name) < fraction else train).append(docs[name])
    return b"\n".join(train), b"\n".join(val)


def _pydocs_documents(unpacked: Path, keep: float) -> dict[str, bytes]:
    root = unpacked / "usr/share/doc/python3.11/html/_sources"
    return {name: p.read_bytes() for p in root.rglob("*.rst.txt")
            if _path_hash(name := str(p.relative_to(root))) < keep}


def _linux_documents(unpacked: Path, keep: float) -> dict[str, bytes]:
    docs = {}
    with tarfile.open(unpacked / "usr/src/linux-source-6.1.tar.xz", "r|xz") as archive:
        for member in archive:  # streamed: only the kept files are read into memory
            name = member.name
            if (member.isfile() and name.endswith((".c", ".h")) and "/asic_reg/" not in name
                    and _path_hash(name) < keep):
                docs[name] = archive.extractfile(member).read()
    return docs


@dataclass(frozen=True)
class Corpus:
    title: str  # what a report calls it
    package: str  # the Debian package that holds it
    documents: Callable[[Path, float], dict[str, bytes]]  # (unpacked package, keep) -> documents
    license: str
    validation: float  # the hash range's share (of all documents) that goes to validation
    keep: float = 1.0  # the hash range's share of documents kept at all (those whose hash is below it)


CORPORA = {
    "pydocs": Corpus("Python 3.11 docs (Debian python3.11-doc)", "python3.11-doc", _pydocs_documents,
                     "Python Software Foundation License", 0.1),
    "linux": Corpus("Linux 6.1 C source (Debian linux-source-6.1)", "linux-source-6.1", _linux_documents,
                    "GPL-2.0 WITH Linux-syscall-note", 0.005, keep=0.36),
}


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")


def _decompress_travelled(out: Path) -> None:
    """``train.bin.xz``/``val.bin.xz`` (how a prepared corpus travels) decompressed beside themselves."""
    for part in ("train.bin", "val.bin"):
        packed = out / f"{part}.xz"
        if packed.exists() and not (out / part).exists():
            with lzma.open(packed) as src, open(out / f"{part}.tmp", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
            (out / f"{part}.tmp").rename(out / part)


def prepare_corpus(data_dir: Path, name: str = "pydocs") -> Path:
    """``<data_dir>/<name>/{train,val}.bin`` (uint8 bytes), fetching the corpus' Debian package if needed."""
    corpus = CORPORA[name]
    out = Path(data_dir) / name
    _decompress_travelled(out)
    if (out / "train.bin").exists() and (out / "val.bin").exists():
        return out
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError(f"the corpus is not prepared in {out} and apt-get/dpkg are missing to fetch "
                           f"Debian's {corpus.package}; copy a prepared {out} here")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        logger.warning("fetching Debian package %s (once)", corpus.package)
        _run(["apt-get", "download", corpus.package], tmp)
        deb = next(tmp.glob(f"{corpus.package}_*.deb"))
        _run(["dpkg", "-x", str(deb), "x"], tmp)
        docs = corpus.documents(tmp / "x", corpus.keep)
        if not docs:
            raise RuntimeError(f"no documents found in {deb.name}")
        train, val = split_documents(docs, corpus.validation)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.bin").write_bytes(train)
        (out / "val.bin").write_bytes(val)
        (out / "SOURCE.txt").write_text(
            f"Debian package {deb.name}: {len(docs)} documents\n"
            f"License: {corpus.license} (see the package's copyright file)\n"
            f"train bytes {len(train)}, validation bytes {len(val)}\n")
    return out


def load_corpus(data_dir: Path, name: str = "pydocs") -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) bytes as uint8 arrays, memory-mapped (the Linux corpus is ~270 MB)."""
    path = prepare_corpus(data_dir, name)
    return (np.memmap(path / "train.bin", dtype=np.uint8, mode="r"),
            np.memmap(path / "val.bin", dtype=np.uint8, mode="r"))


def prepare_digits(data_dir: Path) -> Path:
    """``<data_dir>/digits/digits.csv.gz`` taken out of the scikit-learn wheel."""
    out = Path(data_dir) / "digits"
    target = out / "digits.csv.gz"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
              f"scikit-learn=={SKLEARN_VERSION}", "-d", str(tmp)], tmp)
        wheel = next(tmp.glob("scikit_learn-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            payload = z.read("sklearn/datasets/data/digits.csv.gz")
        out.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
        (out / "SOURCE.txt").write_text(f"{wheel.name}: sklearn/datasets/data/digits.csv.gz "
                                        "(UCI optical recognition of handwritten digits; BSD-3-Clause)\n")
    return target


def load_digits(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 in [0, 1], shape (n, 64), and int64 labels."""
    raw = gzip.decompress(prepare_digits(data_dir).read_bytes())
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float32)
    return table[:, :-1] / 16.0, table[:, -1].astype(np.int64)
