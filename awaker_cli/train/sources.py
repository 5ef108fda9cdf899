"""Where training records come from, and how one raw record becomes turns and images.

Sources (docs: recipes/README.md "Data"):
- JSON (an array of records) and JSONL files: indexed in one linear pass that keeps only each record's
  byte offset, length and line (about 20 bytes a record), never the file; a record is read back and
  decoded when it is needed (in the loader workers while training).
- Hugging Face `datasets`: a `save_to_disk` folder, `.parquet` and `.arrow` files; images stored as
  bytes (the `Image` feature) or as paths. Rows are read by index, lazily, like the files.
- LLaMA-Factory's registry: `data.dataset: a,b` names entries of `data.dataset_dir/dataset_info.json`
  (`file_name`, `formatting` sharegpt|alpaca, `columns`, `tags`).

Record layouts (detected per record unless data.format or the registry entry says which):
- messages: {"messages": [{"role": "user", "content": "<image>..."}, ...], "images": [...]}
- conversations (sharegpt): {"conversations": [{"from": "human", "value": "<image>..."}, ...], "image": ...}
- alpaca: {"instruction": ..., "input": ..., "output": ..., "system": ..., "history": [[q, a], ...]}
A turn's content may be a string with `<image>` placeholders or a content list
([{"type": "image"}, {"type": "text", "text": ...}], as OpenAI, TRL and Qwen's finetune code write).
"""
from __future__ import annotations

import codecs
import json
import os
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import AwakerError

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "model": "assistant"}
_UNSUPPORTED_TAGS = ("<video>", "<audio>")
_BOM = codecs.BOM_UTF8
_HF_SUFFIXES = (".parquet", ".arrow")


class BadRecord(Exception):
    """A record that cannot be trained on; str() is the reason, `kind` the short reason counted."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind or message.split(" (")[0]


@dataclass(frozen=True)
class ImageBytes:
    """An image stored inside the data (a datasets `Image` feature's bytes)."""

    data: bytes = field(repr=False)
    name: str = "image bytes"

    def __str__(self) -> str:
        return self.name


@dataclass
class Record:
    file: Path
    line: int  # the line a file record starts on; for a datasets row, its row number
    layout: str
    turns: list[tuple[str, str]]  # (system|user|assistant, text with <image> placeholders)
    images: list  # Path or ImageBytes
    task: str | None = None
    row: bool = False  # line is a datasets row number

    @property
    def where(self) -> str:
        return f"{self.file}:row {self.line}" if self.row else f"{self.file}:{self.line}"


# -- how a raw record is read ------------------------------------------------------------------------
@dataclass(frozen=True)
class Schema:
    """How to read the records of one source: data.format, or a registry entry's formatting, columns
    and tags (LLaMA-Factory's names and defaults)."""

    formatting: str = "auto"  # auto | messages | conversations | alpaca
    columns: tuple = ()  # (name, column) pairs: messages, images, system, prompt, query, response, history
    tags: tuple = ()  # (name, value) pairs: role_tag, content_tag, user_tag, assistant_tag, system_tag
    registry: bool = False  # from a dataset_info.json entry

    def column(self, name: str, default: str) -> str:
        return dict(self.columns).get(name) or default

    @classmethod
    def from_registry(cls, entry: dict, where: str) -> "Schema":
        fmt = entry.get("formatting", "alpaca")
        if fmt not in ("alpaca", "sharegpt"):
            raise AwakerError(f"{where}: formatting {fmt!r} is not supported (alpaca or sharegpt)")
        columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
        if not isinstance(columns, dict) or not isinstance(tags, dict):
            raise AwakerError(f"{where}: columns and tags must be mappings")
        for what in ("videos", "audios"):
            if what in columns:
                raise AwakerError(f"{where}: a {what} column is not supported (images only)")
        return cls("alpaca" if fmt == "alpaca" else "conversations", tuple(sorted(columns.items())),
                   tuple(sorted(tags.items())), True)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} must be a string, got {type(value).__name__}")
    return value


def _content(value, what: str, inline: list) -> str:
    """A turn's content: a string, or a content list whose image items become <image> placeholders
    (their sources, if given inline, are appended to `inline`)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRecord(f"{what} must be a string or a content list, got {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, str):
            out.append(item)
            continue
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            out.append(_text(item.get("text"), f"{what} text item"))
        elif kind in ("image", "image_url"):
            src = item.get("image", item.get("path", item.get("url")))
            if kind == "image_url":
                url = item.get("image_url")
                src = url.get("url") if isinstance(url, dict) else url
            if src is not None:
                inline.append(src)
            out.append(IMAGE_PLACEHOLDER)
        elif kind in ("video", "audio", "input_audio", "video_url"):
            raise BadRecord(f"{what} has a {kind} item: videos and audio are not supported", "video or audio")
        else:
            raise BadRecord(f"{what} has a content item without a known type (text or image)")
    return "".join(out)


def _present(obj: dict, key: str) -> bool:
    """A key with a value: uniform-schema exports write null or [] for media a record does not have."""
    return obj.get(key) not in (None, [], "")


def parse(obj, schema: Schema) -> tuple[str, list[tuple[str, str]], list, str | None]:
    """A raw record -> (layout, turns, image sources, task); BadRecord if it is not a record."""
    if not isinstance(obj, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(obj).__name__}")
    fmt = schema.formatting
    img_col = schema.column("images", "images")
    sys_col = schema.column("system", "system")
    if fmt == "alpaca" or (fmt == "auto" and "messages" not in obj and "conversations" not in obj
                           and "instruction" in obj and "output" in obj):
        layout, turns, inline = "alpaca", _alpaca(obj, schema), []
    else:
        if schema.registry:  # sharegpt: the messages column, whatever its name
            layout, key = "conversations", schema.column("messages", "conversations")
            if key not in obj:
                raise BadRecord(f"no {key!r} list")
        else:
            has_m, has_c = "messages" in obj, "conversations" in obj
            if has_m and has_c:
                raise BadRecord("has both 'messages' and 'conversations'")
            layout = "messages" if has_m else "conversations" if has_c else None
            if layout is None:
                raise BadRecord("no 'messages' or 'conversations' list (nor alpaca 'instruction' and 'output')")
            if fmt != "auto" and layout != fmt:
                raise BadRecord(f"is in the {layout} layout, but data.format is {fmt}")
            key = layout
        inline = []
        turns = _chat_turns(obj, obj[key], key, layout, schema, inline)
    for media in ("video", "videos", "audio", "audios"):
        if _present(obj, media):
            raise BadRecord("videos and audio are not supported", "video or audio")
    # a system column is used only when the turns have no system turn (LLaMA-Factory: the turn wins)
    if _present(obj, sys_col) and turns[0][0] != "system" and layout != "alpaca":
        turns.insert(0, ("system", _text(obj[sys_col], f"'{sys_col}'")))
    if img_col == "images" and _present(obj, "images") and _present(obj, "image"):
        raise BadRecord("has both 'image' and 'images'")
    images = obj.get(img_col) if _present(obj, img_col) else obj.get("image") if img_col == "images" else None
    images = [] if images in (None, "") else images
    if not isinstance(images, list):
        images = [images]
    if inline:
        if images:
            raise BadRecord("has images both in its content items and in an images column")
        images = inline
    for p in images:
        if not (isinstance(p, str) and p) and not (isinstance(p, dict) and (p.get("bytes") or p.get("path"))) \
                and not isinstance(p, bytes):
            raise BadRecord("'images' must be a path or a list of paths (or image bytes)")
    for _, text in turns:
        for tag in _UNSUPPORTED_TAGS:
            if tag in text:
                raise BadRecord(f"has a {tag} tag: videos and audio are not supported", "video or audio")
    task = obj.get("task")
    if task is not None:
        _text(task, "'task'")
    return layout, turns, images, task



def _chat_turns(obj, raw_turns, key: str, layout: str, schema: Schema, inline: list) -> list[tuple[str, str]]:
    if not isinstance(raw_turns, list) or not raw_turns:
        raise BadRecord(f"'{key}' must be a non-empty list")
    tags = dict(schema.tags)
    if layout == "messages":
        role_key, text_key, roles = "role", "content", _ROLES
    else:
        role_key, text_key = tags.get("role_tag", "from"), tags.get("content_tag", "value")
        roles = dict(_ROLES)
        if tags:  # a registry entry's tags name the roles exactly
            roles = {tags.get("user_tag", "human"): "user", tags.get("assistant_tag", "gpt"): "assistant",
                     tags.get("system_tag", "system"): "system"}
        # plain sharegpt files also use role/content (LLaMA-Factory's openai-style demos)
        if not tags and raw_turns and isinstance(raw_turns[0], dict) and "from" not in raw_turns[0] \
                and "role" in raw_turns[0]:
            role_key, text_key = "role", "content"
    unsupported = {tags.get("observation_tag", "observation"), tags.get("function_tag", "function_call"),
                   "tool", "function", "observation", "function_call"}
    turns = []
    for i, t in enumerate(raw_turns, 1):
        if not isinstance(t, dict) or role_key not in t or text_key not in t:
            raise BadRecord(f"turn {i} needs '{role_key}' and '{text_key}'")
        raw_role = str(t[role_key])
        role = roles.get(raw_role) or (None if tags else roles.get(raw_role.lower()))
        if role is None:
            if raw_role in unsupported:
                raise BadRecord(f"turn {i} is a {raw_role} turn: tool calls are not supported", "tool turn")
            raise BadRecord(f"turn {i} has an unknown {role_key} {t[role_key]!r}")
        turns.append((role, _content(t[text_key], f"turn {i} {text_key}", inline)))
    return turns


def _alpaca(obj: dict, schema: Schema) -> list[tuple[str, str]]:
    """LLaMA-Factory's alpaca conversion: system, the history pairs, then instruction + "\\n" + input."""
    col = schema.column
    prompt, query, response = col("prompt", "instruction"), col("query", "input"), col("response", "output")
    system, history = col("system", "system"), col("history", "history")
    turns = []
    if _present(obj, system):
        turns.append(("system", _text(obj[system], f"'{system}'")))
    pairs = obj.get(history) or []
    if not isinstance(pairs, list):
        raise BadRecord(f"'{history}' must be a list of [question, answer] pairs")
    for i, pair in enumerate(pairs, 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadRecord(f"'{history}' item {i} must be a [question, answer] pair")
        turns += [("user", _text(pair[0], f"'{history}' item {i}")), ("assistant", _text(pair[1], f"'{history}' item {i}"))]
    if prompt not in obj:
        raise BadRecord(f"no '{prompt}'")
    text = _text(obj[prompt], f"'{prompt}'")
    if _present(obj, query):
        text = "\n".join([text, _text(obj[query], f"'{query}'")]) if text else _text(obj[query], f"'{query}'")
    if response not in obj:
        raise BadRecord(f"no '{response}'")
    turns += [("user", text), ("assistant", _text(obj[response], f"'{response}'"))]
    return turns


def check_turns(turns: list[tuple[str, str]], n_images: int):
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    if not body:
        raise BadRecord("no user or assistant turn")
    for i, (role, text) in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise BadRecord(f"turn {i + 1} is a {role} turn where a {want} turn belongs "
                            "(turns alternate user, assistant after an optional system turn)")
        if role == "assistant" and not text.strip():
            raise BadRecord(f"empty assistant turn (turn {i + 1})")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise BadRecord(f"{IMAGE_PLACEHOLDER} in an assistant turn (turn {i + 1})")
    if body[-1][0] != "assistant":
        raise BadRecord("the last turn must be the assistant's")
    if turns[0][0] == "system" and IMAGE_PLACEHOLDER in turns[0][1]:
        raise BadRecord(f"{IMAGE_PLACEHOLDER} in the system turn")
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if placeholders != n_images:
        raise BadRecord(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s)")


def resolve_images(images: list, base: str, check_header: dict | None = None) -> list:
    """Image sources -> Path or ImageBytes. Paths are relative to `base`; `file://` URLs are paths.
    check_header: a cache dict; when given, each distinct file's header is opened once."""
    out = []
    for p in images:
        if isinstance(p, dict):  # a datasets Image feature with decode=False
            if p.get("bytes"):
                out.append(ImageBytes(p["bytes"], p.get("path") or "image bytes"))
                continue
            p = p["path"]
        if isinstance(p, bytes):
            out.append(ImageBytes(p))
            continue
        shown = p
        if p.startswith("file://"):
            p = unquote(urlparse(p).path)
        elif re.match(r"^[a-z][a-z0-9+.-]*://", p):
            raise BadRecord(f"image {p} is a URL: download the images and give their paths", "image URL")
        path = os.path.join(base, os.path.expanduser(p))
        if check_header is not None:
            problem = check_header.get(path)
            if problem is None:
                problem = check_header[path] = _header_problem(path)
            if problem:
                raise BadRecord(problem[0].format(shown), problem[1])
        out.append(Path(path))
    return out


def _header_problem(path: str) -> tuple[str, str] | tuple[()]:
    """() if the file exists and PIL reads its header, else (reason with {} for the path as given, kind)."""
    if not os.path.isfile(path):
        return "missing image {} (looked for " + path + ")", "missing image"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):  # the header only; a truncated body is found when it is decoded
            return ()
    except (UnidentifiedImageError, OSError) as e:
        return "image {} is not a readable image (" + type(e).__name__ + ")", "unreadable image"


# -- file indexes ------------------------------------------------------------------------------------
_WS = re.compile(r"[ \t\n\r]*")
CHUNK = 1 << 24  # bytes read at a time while indexing a JSON array
_MAX_RECORD = 1 << 26  # a JSON record this long that still does not parse is broken, not cut by a chunk


def iter_file(path: Path):
    """(byte offset, byte length, line, parsed object or BadRecord) of every record of a JSON/JSONL
    file, in one linear pass that holds at most a chunk of the file."""
    if not path.is_file():
        raise AwakerError(f"{path}: data file not found")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise AwakerError(f"{path}: cannot read ({e.strerror})")
    with f:
        head = f.read(len(_BOM))
        start = len(_BOM) if head == _BOM else 0
        f.seek(start)
        first = b""
        while True:  # the first non-blank character decides: '[' is a JSON array
            c = f.read(1)
            if not c or not c.isspace():
                first = c
                break
        f.seek(start)
        if first == b"[":
            yield from _iter_json_array(path, f, start)
        else:
            yield from _iter_jsonl(f, start)


def _iter_jsonl(f, offset: int):
    for n, raw in enumerate(f, 1):
        size = len(raw)
        if raw.strip():
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                obj = BadRecord("not UTF-8 text")
            except json.JSONDecodeError as e:
                obj = BadRecord(f"bad JSON ({e.msg} at column {e.colno})", "bad JSON")
            yield offset, size, n, obj
        offset += size


def _iter_json_array(path: Path, f, offset: int):
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof = "", 0, False
    at_byte, at_line = offset, 1  # the byte offset and line of buf[pos]

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = f.read(CHUNK)
        try:
            text = utf8.decode(data, final=not data)
        except UnicodeDecodeError:
            raise AwakerError(f"{path}: not UTF-8 text")
        buf, pos = buf[pos:] + text, 0  # drop what is consumed: memory stays about one chunk
        eof = not data
        return True

    def advance(to: int):
        nonlocal pos, at_byte, at_line
        seg = buf[pos:to]
        at_byte += len(seg) if seg.isascii() else len(seg.encode("utf-8"))
        at_line += seg.count("\n")
        pos = to

    def skip_ws():
        while True:
            advance(_WS.match(buf, pos).end())
            if pos < len(buf) or not more():
                return

    skip_ws()
    advance(pos + 1)  # '['
    first = True
    while True:
        skip_ws()
        if pos >= len(buf):
            raise AwakerError(f"{path}:{at_line}: bad JSON (the array is not closed)")
        if buf[pos] == "]":
            return
        if not first:
            if buf[pos] != ",":
                raise AwakerError(f"{path}:{at_line}: bad JSON (expected ',' or ']' between records)")
            advance(pos + 1)
            skip_ws()
        first = False
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                # cut by the end of the chunk? read on (a broken record fails again at the end)
                if len(buf) - pos < _MAX_RECORD and more():
                    continue
                line = at_line + buf.count("\n", pos, max(e.pos, pos))
                raise AwakerError(f"{path}:{line}: bad JSON ({e.msg}); a broken JSON array cannot be skipped")
        start_byte, line = at_byte, at_line
        advance(end)
        yield start_byte, at_byte - start_byte, line, obj


_FDS: dict = {}


def file_stamp(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_slice(path: Path, stamp: tuple, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of the file as it was indexed (`stamp`); one open file per path, version
    and process (loader workers open their own; a file replaced under the same name is a new one)."""
    key = (os.getpid(), str(path), stamp)
    fd = _FDS.get(key)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        if file_stamp(os.fstat(fd)) != stamp:
            os.close(fd)
            raise BadRecord("the data file changed since it was indexed", "data file changed")
        for old in [k for k in _FDS if k[:2] == key[:2]]:  # an older version of the file: not read again
            os.close(_FDS.pop(old))
        _FDS[key] = fd
    return os.pread(fd, length, offset)


class FileSource:
    """The usable records of one JSON/JSONL file: offsets, lengths and lines only (arrays of ints)."""

    def __init__(self, path: Path, base: str, schema: Schema):
        self.path, self.base, self.schema = path, base, schema
        self.stamp = file_stamp(path.stat())
        self.offsets, self.lengths, self.lines = array("q"), array("q"), array("q")

    def add(self, offset: int, length: int, line: int):
        self.offsets.append(offset)
        self.lengths.append(length)
        self.lines.append(line)

    def __len__(self):
        return len(self.offsets)

    def record(self, j: int) -> Record:
        line = self.lines[j]
        try:
            obj = json.loads(read_slice(self.path, self.stamp, self.offsets[j], self.lengths[j]).decode("utf-8"))
            return build_record(obj, self.schema, self.base, self.path, line)
        except (ValueError, OSError) as e:  # the file changed since it was indexed
            raise BadRecord(f"cannot read the record again ({type(e).__name__}); did the file change?")


def build_record(obj, schema: Schema, base: str, file: Path, line: int, row: bool = False,
                 check_header: dict | None = None) -> Record:
    layout, turns, images, task = parse(obj, schema)
    check_turns(turns, len(images))
    return Record(file, line, layout, turns, resolve_images(images, base, check_header), task, row)


# -- Hugging Face datasets ---------------------------------------------------------------------------
def is_hf_source(path: Path) -> bool:
    return path.suffix in _HF_SUFFIXES or (path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")))


def load_hf(path: Path):
    """A datasets.Dataset from a save_to_disk folder (a DatasetDict's 'train' split), parquet or arrow."""
    try:
        import datasets
    except ImportError as e:
        raise AwakerError(f"{path}: reading Hugging Face datasets needs the `datasets` package "
                          f"(pip install 'awaker[datasets]'): {e}")
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise AwakerError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
                ds = ds["train"]
        elif path.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=False)
        else:
            ds = datasets.Dataset.from_file(str(path))
    except AwakerError:
        raise
    except Exception as e:  # datasets raises many kinds; the message names the problem
        raise AwakerError(f"{path}: cannot read as a Hugging Face dataset ({type(e).__name__}: {e})")
    # images as bytes/paths: decoded in the loader workers, not when the row is read
    for name, feature in ds.features.items():
        undecoded = _undecoded(feature, datasets)
        if undecoded is not None:
            ds = ds.cast_column(name, undecoded)
    return ds


def _undecoded(feature, datasets):
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    inner = getattr(feature, "feature", None)
    if isinstance(feature, (datasets.Sequence, getattr(datasets, "List", ()))) and isinstance(inner, datasets.Image):
        return type(feature)(datasets.Image(decode=False))
    if isinstance(feature, list) and feature and isinstance(feature[0], datasets.Image):
        return [datasets.Image(decode=False)]
    return None


class HFSource:
    """The usable rows of a datasets.Dataset (row numbers only); rows are read when needed."""

    def __init__(self, path: Path, base: str, schema: Schema):
        self.path, self.base, self.schema = path, base, schema
        self.rows = array("q")
        self._ds = None

    @property
    def ds(self):
        if self._ds is None:
            self._ds = load_hf(self.path)
        return self._ds

    def __getstate__(self):  # loader workers open the dataset themselves (memory-mapped)
        return {**self.__dict__, "_ds": None}

    def iter_raw(self):
        ds = self.ds
        for i in range(len(ds)):
            yield i, ds[i]

    def add(self, row: int):
        self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def record(self, j: int) -> Record:
        row = self.rows[j]
        return build_record(self.ds[row], self.schema, self.base, self.path, row, row=True)


# -- LLaMA-Factory's registry ------------------------------------------------------------------------
def registry_sources(names: str | list[str], dataset_dir: str) -> list[tuple[Path, Schema]]:
    """(file, schema) for every file of the named dataset_info.json entries."""
    folder = Path(dataset_dir)
    info_path = folder / "dataset_info.json"
    if not info_path.is_file():
        raise AwakerError(f"data.dataset_dir {folder}: no dataset_info.json")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AwakerError(f"{info_path}: not readable JSON ({e})")
    if isinstance(names, str):
        names = [names]
    names = [n.strip() for item in names for n in item.split(",") if n.strip()]
    out = []
    for name in names:
        entry = info.get(name)
        if not isinstance(entry, dict):
            raise AwakerError(f"data.dataset: no {name!r} in {info_path} (it has {', '.join(sorted(info)) or 'none'})")
        where = f"{info_path}: {name}"
        if "file_name" not in entry:
            hub = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                        if k in entry), None)
            raise AwakerError(f"{where}: only local files are read ({hub or 'no file_name'}); download the data "
                              "and give its file_name")
        if entry.get("ranking"):
            raise AwakerError(f"{where}: ranking (preference) datasets are not supported")
        schema = Schema.from_registry(entry, where)
        target = folder / entry["file_name"]
        if target.is_dir() and not is_hf_source(target):
            files = sorted(p for p in target.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise AwakerError(f"{where}: {target} holds no files")
        elif target.exists():
            files = [target]
        else:
            raise AwakerError(f"{where}: {target}: no such file")
        out += [(f, schema) for f in files]
    return out
