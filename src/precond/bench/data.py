"""Real data that ships inside packages, prepared once into ``<data_dir>``.

- **Python documentation** (language modelling): the reStructuredText sources of the Python 3.11
  documentation, from Debian's ``python3.11-doc`` package (``usr/share/doc/python3.11/html/_sources``,
  497 documents, ~11 MB of English prose and code; Python Software Foundation License). Byte-level
  tokens; documents are split into train / validation by a hash of their path, so no document is in both.
- **Digits** (vision): scikit-learn's copy of the UCI optical-recognition digits (1,797 8×8 images,
  10 classes; BSD-3-Clause), read from ``sklearn/datasets/data/digits.csv.gz`` inside the scikit-learn
  wheel (downloaded with ``pip download``, not installed).

Nothing is fetched at training time: ``prepare_*`` fetch by package name (apt / pip) if the prepared files
are missing, which needs those registries once; copy ``<data_dir>`` to machines that have none.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["prepare_corpus", "split_documents", "load_corpus", "prepare_digits", "load_digits",
           "CORPUS_PACKAGE", "SKLEARN_VERSION"]

logger = logging.getLogger(__name__)

CORPUS_PACKAGE = "python3.11-doc"
CORPUS_SOURCES = "usr/share/doc/python3.11/html/_sources"
SKLEARN_VERSION = "1.9.1"
VALIDATION_FRACTION = 0.1


def split_documents(docs: dict[str, bytes], fraction: float = VALIDATION_FRACTION) -> tuple[bytes, bytes]:
    """Concatenate documents into (train, validation) byte strings; a document goes to validation when the
    hash of its name falls in the first ``fraction`` of the hash range (stable across machines)."""
    train, val = [], []
    for name in sorted(docs):
        h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if h < fraction else train).append(docs[name])
    return b"\n".join(train), b"\n".join(val)


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")


def prepare_corpus(data_dir: Path) -> Path:
    """``<data_dir>/pydocs/{train,val}.bin`` (uint8 bytes), fetching Debian's package if needed."""
    out = Path(data_dir) / "pydocs"
    if (out / "train.bin").exists() and (out / "val.bin").exists():
        return out
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError(f"the corpus is not prepared in {out} and apt-get/dpkg are missing to fetch "
                           f"Debian's {CORPUS_PACKAGE}; copy a prepared {out} here")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        logger.info("fetching Debian package %s", CORPUS_PACKAGE)
        _run(["apt-get", "download", CORPUS_PACKAGE], tmp)
        deb = next(tmp.glob(f"{CORPUS_PACKAGE}_*.deb"))
        _run(["dpkg", "-x", str(deb), "x"], tmp)
        root = tmp / "x" / CORPUS_SOURCES
        docs = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.rst.txt")}
        if not docs:
            raise RuntimeError(f"no .rst.txt sources found in {deb.name}")
        train, val = split_documents(docs)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.bin").write_bytes(train)
        (out / "val.bin").write_bytes(val)
        (out / "SOURCE.txt").write_text(
            f"Debian package {deb.name}: {len(docs)} documents from /{CORPUS_SOURCES}\n"
            "License: Python Software Foundation License (see the package's copyright file)\n"
            f"train bytes {len(train)}, validation bytes {len(val)}\n")
    return out


def load_corpus(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    path = prepare_corpus(data_dir)
    return (np.frombuffer((path / "train.bin").read_bytes(), dtype=np.uint8),
            np.frombuffer((path / "val.bin").read_bytes(), dtype=np.uint8))


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
