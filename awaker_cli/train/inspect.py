"""`awaker data inspect`: what training will see, through exactly its reader and encoder.

The first N samples rendered token by token (trained tokens marked, the routing span shown, image
tokens collapsed to one mark with their count), then the whole set: records, skipped records by reason
(the index pass's and those only encoding finds), token lengths, how many exceed cutoff_len, images
per record.
"""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import AwakerError
from .data import IGNORE_INDEX, BadRecord, Encoder, read_records


@dataclass
class InspectSettings:
    """The data settings inspect applies: a recipe's data section, or the defaults."""

    files: list[str]
    processor_dir: str
    fmt: str = "auto"
    image_root: str | None = None
    dataset: list[str] | None = None
    dataset_dir: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    cutoff_len: int = 2048
    span_rule: str | None = None


def settings_from(sources: list[str], recipe: str | None, overrides: list[str], model: str | None) -> InspectSettings:
    from .recipe import DataSection, load_recipe

    if recipe:
        r = load_recipe(recipe, overrides)
        d = r.data
        source = model or (r.model if r.stage == 1 else r.init_from)
    else:
        if overrides:
            raise AwakerError("key=value overrides need --recipe")
        d, source = DataSection(), model
    if not source:
        raise AwakerError("inspect needs a model's processor (tokenizer and chat template): give --model DIR, or a "
                          "--recipe whose model (stage 1) or init_from (stages 2, 3) is set")
    span_rule = None
    if (Path(source) / "awaker_config.json").is_file():
        from ..model.config import AwakerConfig

        span_rule = AwakerConfig.load(source).routing_span
    files = list(sources) or list(d.train)
    if not files and not d.dataset:
        raise AwakerError("nothing to inspect: give data files, or a --recipe with data.train or data.dataset")
    return InspectSettings(files, str(source), d.format, d.image_root, d.dataset if not sources else None,
                           d.dataset_dir, d.min_pixels, d.max_pixels, d.cutoff_len, span_rule)


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def inspect(s: InspectSettings, *, samples: int = 3, limit: int | None = None, index_bar=None, bar=None) -> dict:
    """{"samples": [...], "summary": {...}} (see the module docstring). index_bar(total) -> advance(n)
    context for the index pass (bytes), bar(total) the same for the encoding pass (records)."""
    from ..generate.load import load_processor
    from ..model.routing import SpanTokens

    processor = load_processor(Path(s.processor_dir))
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           (("vision_start", "<|vision_start|>"), ("im_start", "<|im_start|>"), ("im_end", "<|im_end|>"))}
    spans = SpanTokens(**ids) if all(isinstance(v, int) for v in ids.values()) else None
    encoder = Encoder(processor, cutoff_len=s.cutoff_len, span_tokens=spans, span_rule=s.span_rule or "prompt",
                      min_pixels=s.min_pixels, max_pixels=s.max_pixels)
    total_bytes = sum(Path(f).stat().st_size for f in s.files if Path(f).is_file())
    with (index_bar(total_bytes) if index_bar else _null()) as advance:
        done = [0]

        def progress(offset):  # offsets grow within a file; files add up
            advance(max(0, offset - done[0]))
            done[0] = max(done[0], offset)

        records, stats = read_records(s.files, fmt=s.fmt, image_root=s.image_root, skip_bad=True, limit=limit,
                                      dataset=s.dataset, dataset_dir=s.dataset_dir, progress=progress)
    reasons = Counter(stats.reasons)
    lengths, trained, images = [], [], Counter()
    over = 0
    shown = []
    with (bar(len(records)) if bar else _null()) as advance:
        for i in range(len(records)):
            info: dict = {}
            try:
                rec = records.get(i)
                images[len(rec.images)] += 1
                sample = encoder.encode(rec, info)
            except BadRecord as e:
                reasons[e.kind] += 1
                sample = None
                if len(shown) < samples:
                    shown.append({"where": records.where(i), "skipped": str(e), **info})
            if "length" in info:
                lengths.append(info["length"])
                over += info["length"] > s.cutoff_len
            if sample is not None:
                trained.append(int((sample["labels"][1:] != IGNORE_INDEX).sum()))
                if len(shown) < samples:
                    shown.append(_render(rec, sample, info, encoder))
            advance(1)
    lengths.sort()
    summary = {
        "records": len(records) + stats.skipped, "usable": len(trained), "skipped": sum(reasons.values()),
        "skip_reasons": dict(reasons.most_common()), "layouts": dict(stats.layouts),
        "cutoff_len": s.cutoff_len, "over_cutoff_len": over,
        "tokens": {"min": lengths[0] if lengths else 0, "median": int(statistics.median(lengths)) if lengths else 0,
                   "p95": _percentile(lengths, 0.95), "max": lengths[-1] if lengths else 0},
        "trained_tokens": sum(trained), "images_per_record": {str(k): v for k, v in sorted(images.items())},
        "processor": s.processor_dir, "files": stats.files, "limit": limit,
    }
    return {"samples": shown, "summary": summary}


class _null:
    def __enter__(self):
        return lambda n: None

    def __exit__(self, *exc):
        return False


def _render(rec, sample: dict, info: dict, encoder: Encoder) -> dict:
    """The sample as segments of text: (text, trained, in routing span, image tokens)."""
    ids = sample["input_ids"].tolist()
    labels = sample["labels"].tolist()
    span = sample["span"].tolist() if "span" in sample else [0, 0]
    segments = []  # [text, trained, in_span, n_image_tokens]
    run, key = [], None
    image_id = encoder.image_token_id

    def flush():
        if not run:
            return
        trained, in_span, image = key
        text = f"<image ×{len(run)}>" if image else encoder.tokenizer.decode(run)
        segments.append({"text": text, "trained": trained, "span": in_span, "image_tokens": len(run) if image else 0})

    for i, t in enumerate(ids):
        k = (labels[i] != IGNORE_INDEX and i > 0, span[0] <= i < span[1], t == image_id)
        if k != key or (t == image_id) != (key[2] if key else False):
            flush()
            run, key = [], k
        run.append(t)
    flush()
    return {"where": rec.where, "layout": rec.layout, "task": rec.task, "tokens": len(ids),
            "trained": sum(1 for i, x in enumerate(labels) if x != IGNORE_INDEX and i > 0),
            "length_before_cutoff": info.get("length"), "span": span,
            "images": [{"source": str(p), "size": sz, "resized": rz, "tokens": n}
                       for p, sz, rz, n in zip(rec.images, info.get("image_sizes", []), info.get("resized", []),
                                               info.get("image_tokens", []))],
            "segments": segments}
