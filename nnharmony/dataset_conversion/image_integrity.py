"""Is an image file complete? Truncated and corrupt files that image readers accept silently.

SimpleITK reads a truncated ``.nii.gz`` (and a truncated plain ``.nii``) without an error: the missing part
comes back as zeros, so a half-copied download would train on a half-black image or a half-empty label map.
:func:`check_image_file_intact` reads the whole file once (streamed, constant memory) and tells what is wrong:

- ``*.gz`` (``.nii.gz``, ``.gipl.gz``, ...): the gzip stream is decompressed to its end, which checks its CRC-32
  and length fields; a stream that stops early, a CRC error or corrupt deflate data is reported;
- NIfTI (``.nii``, ``.nii.gz``): the (decompressed) file must hold ``vox_offset + voxels * bytes per voxel``
  bytes, as the header promises;
- PNG: signature, every chunk's CRC, the IDAT zlib stream decompressed to its end, and the closing IEND chunk;
- NRRD (``.nrrd`` with attached data) and MetaImage (``.mha``, ``.mhd`` with ``ElementDataFile = LOCAL`` or a
  detached raw file): gzip / zlib compressed data decompressed to its end and its length compared with the
  header's sizes; uncompressed data must be at least as long as the header's sizes require.

Other formats are not inspected (their readers fail loudly on short files). A check costs one read of the
file: about as long as decompressing it, far less than reading it with SimpleITK.
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["check_image_file_intact", "image_file_problem"]

_CHUNK = 1 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_image_file_intact(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` ``"<path>: <problem>"`` when the image file is truncated or corrupt (see module
    docstring for what is checked); return None when it is complete."""
    why = image_file_problem(path)
    if why:
        raise ValueError(f"{path}: {why}")


def image_file_problem(path: str | os.PathLike) -> str | None:
    """Why the image file is truncated or corrupt (one line), None when it is complete or its format is not
    inspected. A file that cannot be opened at all is reported too."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".png"):
            return _png_problem(path)
        if name.endswith(".gz") and not _starts_with(path, b"\x1f\x8b"):
            # not gzip at all: NIfTI readers open such files as uncompressed; anything else is left to the reader
            return _nifti_size_problem(path, path.stat().st_size, False) if name.endswith(".nii.gz") else None
        if name.endswith(".gz"):
            why, n = _gzip_problem(path)
            if why is None and name.endswith(".nii.gz"):
                why = _nifti_size_problem(path, n, compressed=True)
            return why
        if name.endswith(".nii"):
            return _nifti_size_problem(path, path.stat().st_size, compressed=False)
        if name.endswith((".nrrd", ".nhdr")):
            return _nrrd_problem(path)
        if name.endswith((".mha", ".mhd")):
            return _meta_problem(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


# ---------------------------------------------------------------------------------------------- gzip / zlib
def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _gzip_problem(path: Path, offset: int = 0) -> tuple[str | None, int]:
    """(problem, decompressed length) of the gzip stream(s) starting at ``offset``."""
    n = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                while True:
                    block = f.read(_CHUNK)
                    if not block:
                        break
                    n += len(block)
    except EOFError:
        return ("truncated gzip stream: the file ends before the end of the compressed data "
                "(cut short, e.g. an incomplete copy or download)"), n
    except gzip.BadGzipFile as e:
        return f"corrupt gzip data ({e})", n
    except zlib.error as e:
        return f"corrupt gzip data (deflate stream: {e})", n
    return None, n


def _zlib_problem(path: Path, offset: int, expected: int | None, what: str) -> str | None:
    d = zlib.decompressobj()
    n = 0
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while not d.eof:
                block = f.read(_CHUNK)
                if not block:
                    break
                n += len(d.decompress(block))
    except zlib.error as e:
        return f"corrupt {what} (zlib: {e})"
    if not d.eof:
        return f"truncated {what}: the file ends before the end of the compressed data ({n} bytes decompressed)"
    if expected is not None and n < expected:
        return f"{what} holds {n} bytes, the header's sizes need {expected}"
    return None


# ---------------------------------------------------------------------------------------------- NIfTI
def _nifti_size_problem(path: Path, available: int, compressed: bool) -> str | None:
    try:
        import nibabel as nib
    except ImportError:  # pragma: no cover - nibabel comes with nnunetv2
        return None
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            head = f.read(540)
        nifti2 = 540 in (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0])
        cls = nib.Nifti2Header if nifti2 else nib.Nifti1Header
        header = cls.from_fileobj(io.BytesIO(head), check=False)
        offset = int(header["vox_offset"])
        itemsize = np.dtype(header.get_data_dtype()).itemsize
        need = offset + int(np.prod(header.get_data_shape(), dtype=np.int64)) * itemsize
    except Exception:  # not a header nibabel understands: leave the verdict to SimpleITK
        return None
    if available < need:
        kind = "decompressed data" if compressed else "file"
        return (f"truncated NIfTI: the {kind} holds {available} bytes but the header's shape "
                f"{tuple(header.get_data_shape())} x {itemsize} byte(s) needs {need}")
    return None


# ---------------------------------------------------------------------------------------------- PNG
def _png_problem(path: Path) -> str | None:
    size = path.stat().st_size
    d = zlib.decompressobj()
    seen_iend = False
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return "not a PNG file (bad signature)"
        while True:
            head = f.read(8)
            if not head:
                break
            if len(head) < 8:
                return "truncated PNG: the file ends inside a chunk header"
            length, ctype = struct.unpack(">I4s", head)
            if f.tell() + length + 4 > size:
                return (f"truncated PNG: chunk {ctype.decode('latin-1')!r} needs {length + 4} more bytes than "
                        f"the file has")
            data = f.read(length)
            crc = struct.unpack(">I", f.read(4))[0]
            if zlib.crc32(ctype + data) & 0xFFFFFFFF != crc:
                return f"corrupt PNG: CRC error in chunk {ctype.decode('latin-1')!r}"
            if ctype == b"IDAT":
                try:
                    d.decompress(data)
                except zlib.error as e:
                    return f"corrupt PNG: image data (zlib: {e})"
            if ctype == b"IEND":
                seen_iend = True
                break
    if not seen_iend:
        return "truncated PNG: no IEND chunk (the file was cut short)"
    if not d.eof:
        return "truncated PNG: the image data (IDAT) stream is incomplete"
    return None


# ---------------------------------------------------------------------------------------------- NRRD / MetaImage
_NRRD_TYPES = {
    "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2,
    "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2,
    "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4,
    "uint32_t": 4, "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8,
    "signed long long int": 8, "int64": 8, "int64_t": 8, "ulonglong": 8, "unsigned long long": 8,
    "unsigned long long int": 8, "uint64": 8, "uint64_t": 8, "float": 4, "double": 8,
}
_META_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}


def _read_header_lines(path: Path, stop) -> tuple[dict[str, str], int]:
    """Header ``key -> value`` (keys lower-case) and the byte offset where the data starts."""
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        while True:
            line = f.readline(1 << 16)
            if not line:
                return fields, f.tell()
            text = line.decode("latin-1").rstrip("\r\n")
            if stop(text, fields):
                if text.strip() and "=" in text:  # MetaImage: the ElementDataFile line is the last header line
                    k, v = text.split("=", 1)
                    fields[k.strip().lower()] = v.strip()
                return fields, f.tell()
            for sep in (":=", ":", "="):
                if sep in text and not text.startswith("#"):
                    k, v = text.split(sep, 1)
                    fields.setdefault(k.strip().lower(), v.strip())
                    break


def _nrrd_problem(path: Path) -> str | None:
    fields, offset = _read_header_lines(path, lambda text, _: text == "")
    if "data file" in fields or "datafile" in fields:
        return None  # detached data (.nhdr): the reader checks the data file
    try:
        sizes = [int(s) for s in fields["sizes"].split()]
        itemsize = _NRRD_TYPES[fields["type"].lower()]
    except (KeyError, ValueError):
        return None
    need = int(np.prod(sizes, dtype=np.int64)) * itemsize
    enc = fields.get("encoding", "raw").lower()
    if enc in ("gzip", "gz"):
        why, n = _gzip_problem(path, offset)
        if why:
            return why
        return None if n >= need else f"gzip data holds {n} bytes, the header's sizes need {need}"
    if enc == "raw" and path.stat().st_size - offset < need:
        return f"truncated NRRD: {path.stat().st_size - offset} data bytes, the header's sizes need {need}"
    return None


def _meta_problem(path: Path) -> str | None:
    fields, offset = _read_header_lines(path, lambda text, _: text.strip().lower().startswith("elementdatafile"))
    try:
        sizes = [int(s) for s in fields["dimsize"].split()]
        itemsize = _META_TYPES[fields["elementtype"].upper()]
        ncomp = int(fields.get("elementnumberofchannels", "1"))
    except (KeyError, ValueError):
        return None
    need = int(np.prod(sizes, dtype=np.int64)) * itemsize * ncomp
    data_file = fields.get("elementdatafile", "LOCAL")
    if data_file.upper() == "LOCAL":
        target, start = path, offset
    else:
        target, start = path.parent / data_file, 0
        if not target.is_file():
            return None  # lists of files, patterns: left to the reader
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if compressed:
        return _zlib_problem(target, start, need, "MetaImage compressed data")
    have = target.stat().st_size - start
    if have < need:
        return f"truncated MetaImage: {have} data bytes, the header's sizes need {need}"
    return None
