"""Read a Qwen-VL (or awaker) checkpoint directory without loading it: config, shard headers, and
tensors one at a time. Every problem a user can cause is an AwakerError naming the file."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AwakerError
from .keys import is_adapter_key, to_hub

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str  # the key as stored in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute position of its first byte in the file

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def resolve_path(path_or_id: str) -> Path:
    """A local directory, or a hub id already in huggingface_hub's local cache (never downloads)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise AwakerError(f"{path_or_id}: not a directory (give the model's directory, not a file)")
    if path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path_or_id, local_files_only=True))
        except Exception:
            raise AwakerError(f"{path_or_id}: no such directory, and not a hub id in the local cache "
                              "(download it first with `hf download`)")
    raise AwakerError(f"{path_or_id}: no such directory")


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that the file holds every byte it promises."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise AwakerError(f"{file}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise AwakerError(f"{file}: corrupt safetensors header (length {n})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AwakerError(f"{file}: corrupt safetensors header")
    except OSError as e:
        raise AwakerError(f"{file}: cannot read ({e.strerror})")
    if not isinstance(header, dict):
        raise AwakerError(f"{file}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    infos, data_size = {}, size - 8 - n
    for name, h in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[h["dtype"]]
            start, end = h["data_offsets"]
            shape = tuple(int(d) for d in h["shape"])
        except (KeyError, TypeError, ValueError):
            raise AwakerError(f"{file}: corrupt safetensors header entry for {name!r}")
        if end > data_size:
            raise AwakerError(f"{file}: truncated ({name!r} ends at byte {end} of a {data_size}-byte data section)")
        info = TensorInfo(file, name, dtype, shape, 8 + n + start)
        if info.nbytes != end - start:
            raise AwakerError(f"{file}: corrupt safetensors header ({name!r} size does not match its shape)")
        infos[name] = info
    return infos


def read_config(directory: Path) -> dict:
    """config.json of a model directory, checked to be of a family awaker supports (model/families.py)."""
    from ..model.families import FAMILIES, supported

    path = directory / "config.json"
    if not path.is_file():
        raise AwakerError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AwakerError(f"{path}: not valid UTF-8 JSON ({e})")
    if not isinstance(config, dict):
        raise AwakerError(f"{path}: not a JSON object")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise AwakerError(f"{path}: not a supported vision-language model (model_type {model_type!r}; "
                          f"supported: {supported()})")
    return config


class Checkpoint:
    """A checkpoint directory. Tensors are addressed by their hub key whatever layout the files use."""

    def __init__(self, path_or_id: str | Path):
        from . import base_ref

        self.path = resolve_path(str(path_or_id))
        self.config = read_config(self.path)
        # an adapter-only directory (checkpoint/base_ref.py): its own file holds the adapters, the base
        # tensors come from the verified base it records
        self.base: Checkpoint | None = None
        self.base_record: dict | None = None
        if base_ref.is_adapter_only(self.path):
            self.base_record = base_ref.read_base_record(self.path)
            self.base = base_ref.open_base(self.path, self.base_record)
            self.weight_map, self.files = None, [self._own_file(base_ref.ADAPTERS_FILE)]
        else:
            self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, info in read_header(file).items():
                self.tensors[to_hub(name)] = info
        self._check_index()
        if self.base is not None:
            stray = [k for k in self.tensors if not is_adapter_key(k)]
            if stray:
                raise AwakerError(f"{self.files[0]}: holds base tensors ({stray[0]}, ...); an adapter-only "
                                  "directory holds adapters and routers only")
            self.tensors = {**self.base.base_tensors(), **self.tensors}

    @property
    def weights_path(self) -> Path:
        """The directory that holds the base weights (transformers loads the base from there)."""
        return self.base.path if self.base is not None else self.path

    @property
    def input_paths(self) -> list[Path]:
        """Every directory this checkpoint reads: an output may replace none of them."""
        return [self.path] + ([self.base.path] if self.base is not None else [])

    def base_tensors(self) -> dict[str, TensorInfo]:
        return {k: v for k, v in self.tensors.items() if not is_adapter_key(k)}

    def _own_file(self, name: str) -> Path:
        file = self.path / name
        if not file.is_file():
            raise AwakerError(f"{self.path}: adapter-only model without its {name}")
        return file

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                self.weight_map = None
            if not isinstance(self.weight_map, dict):
                raise AwakerError(f"{index}: not a valid safetensors index (needs a weight_map object)")
            files = []
            for name in dict.fromkeys(self.weight_map.values()):
                file = self.path / name
                if not file.is_file():
                    raise AwakerError(f"{index}: points to a missing shard {name}")
                files.append(file)
            return files
        self.weight_map = None
        single = self.path / SINGLE_NAME
        if single.is_file():
            return [single]
        if list(self.path.glob("*.bin")):
            raise AwakerError(f"{self.path}: only PyTorch .bin weights found; awaker reads safetensors "
                              "(for the Awaker2.5-VL release file use `awaker convert`)")
        raise AwakerError(f"{self.path}: no model.safetensors or {INDEX_NAME}")

    def _check_index(self):
        if self.weight_map is None:
            return
        for key, name in self.weight_map.items():
            info = self.tensors.get(to_hub(key))
            if info is None or info.file.name != name:
                raise AwakerError(f"{self.path / INDEX_NAME}: lists {key!r} in {name}, which does not hold it")

    # -- config helpers -------------------------------------------------------------------------------
    @property
    def family(self):
        """The model family (model/families.py) this directory's config.json names."""
        from ..model.families import family_of_config

        return family_of_config(self.config)

    @property
    def text_config(self) -> dict:
        """Text fields whether config.json is nested (transformers 5) or flat (the original releases)."""
        return self.config.get("text_config") or self.config

    def _text_field(self, name: str) -> int:
        try:
            return int(self.text_config[name])
        except (KeyError, TypeError, ValueError):
            raise AwakerError(f"{self.path / 'config.json'}: no valid {name}")

    @property
    def num_layers(self) -> int:
        return self._text_field("num_hidden_layers")

    @property
    def hidden_size(self) -> int:
        return self._text_field("hidden_size")

    # -- tensors --------------------------------------------------------------------------------------
    def ordered_keys(self) -> list[str]:
        """Hub keys in on-disk order (file by file, by offset): the fastest order to stream them."""
        files = (self.base.files if self.base is not None else []) + self.files
        order = {f: i for i, f in enumerate(files)}
        return sorted(self.tensors, key=lambda k: (order[self.tensors[k].file], self.tensors[k].offset))

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read with a plain positioned read (no mmap), so streaming keys one at a time keeps
        resident memory to the tensors the caller holds, whatever the size of the shard."""
        info = self.tensors[key]
        buf = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            if f.readinto(buf) != info.nbytes:
                raise AwakerError(f"{info.file}: truncated while reading {info.name!r}")
        if not buf:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    @property
    def base_bytes(self) -> int:
        return sum(i.nbytes for i in self.base_tensors().values())

    @property
    def adapter_bytes(self) -> int:
        """Bytes of the adapter and router tensors alone."""
        return self.total_bytes - self.base_bytes
