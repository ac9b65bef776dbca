"""Prepared TFDS datasets (ArrayRecord) read through `tfds.data_source`, and a writer for them.

Feature convention of the datasets `prepare_tfds` writes (any Source can be prepared this way):
  "sample": Text    the Sample as JSON (masks stay RLE; frame paths are kept for reference)
  "frames": Sequence(bytes)   the encoded image files, in frame order (absent frames: b"")
`TfdsSource` returns Samples whose frames are "tfds://{name}/{split}/{index}/{t}" and whose
meta["frame_bytes"] holds the encoded images; `open_frame(sample, t)` (common.py) opens either kind.
Other TFDS datasets can be read with a custom `to_sample(features, index) -> Sample`.

Writing and reading work without TensorFlow as long as no feature needs TF to *encode* (the image
bytes are stored as opaque tensors, not as tfds.features.Image, whose encoder calls TF).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os

import numpy as np

from x2sam_jax.data.schema import BadSample, Instance, Phrase, Sample, VisualPrompt
from x2sam_jax.data.sources.common import Source, require_dir


# ----------------------------------------------------------------------------------- Sample <-> JSON
def _json_default(obj):
    if isinstance(obj, bytes):  # RLE counts may be bytes; keep them distinguishable from str
        return {"__bytes__": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _restore_bytes(obj):
    if isinstance(obj, dict):
        if set(obj) == {"__bytes__"}:
            return base64.b64decode(obj["__bytes__"])
        return {k: _restore_bytes(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_bytes(v) for v in obj]
    return obj


def sample_to_json(sample: Sample) -> str:
    return json.dumps(dataclasses.asdict(sample), default=_json_default, sort_keys=True)


def sample_from_json(text: str | bytes) -> Sample:
    d = _restore_bytes(json.loads(text))
    d["instances"] = [Instance(**i) for i in d.get("instances", [])]
    d["phrases"] = [Phrase(**{**p, "span": tuple(p["span"]) if p.get("span") is not None else None})
                    for p in d.get("phrases", [])]
    d["visual_prompts"] = [VisualPrompt(**{**v, "box": tuple(v["box"]) if v.get("box") is not None else None})
                           for v in d.get("visual_prompts", [])]
    return Sample(**d)


# ----------------------------------------------------------------------------------- writer
def _features():
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "sample": tfds.features.Text(),
        "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    })


def prepare_tfds(name: str, data_dir: str, splits: dict, *, version: str = "1.0.0", embed_frames: bool = True) -> str:
    """Write `splits` ({split name: Source or list of Samples}) as an ArrayRecord TFDS dataset.

    Returns the builder directory ({data_dir}/{name}/{version}). Samples that raise BadSample are
    left out (counted in the returned dataset's metadata description).
    """
    import tensorflow_datasets as tfds

    skipped = {}

    def examples(split, source):
        skipped[split] = 0
        for i in range(len(source)):
            try:
                sample = source[i]
            except BadSample:
                skipped[split] += 1
                continue
            frames = []
            # A video-chat sample's single entry is a video file or frame directory: kept by path.
            for path in sample.frames if embed_frames and not sample.meta.get("video_file") else []:
                with open(path, "rb") as f:
                    frames.append(f.read())
            yield f"{i:09d}", {"sample": sample_to_json(sample), "frames": frames}

    class _SampleBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        code_path = None  # no checksums file: locating one walks package resources (needs importlib_resources)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=_features(),
                                         description="x2sam_jax Samples (JSON) with embedded frames",
                                         disable_shuffling=True)  # keep source order

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, src) for split, src in splits.items()}

        def _generate_examples(self, split, source):
            return examples(split, source)

    _SampleBuilder.name = name
    builder = _SampleBuilder(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return os.path.join(data_dir, name, version)


# ----------------------------------------------------------------------------------- reader
class TfdsSource(Source):
    """A prepared TFDS split as a Source: `TfdsSource(builder_dir=..., split=...)` or (name=, data_dir=)."""

    def __init__(self, *, split: str, builder_dir: str | None = None, name: str | None = None,
                 data_dir: str | None = None, to_sample=None, source_name: str | None = None):
        import tensorflow_datasets as tfds

        if builder_dir is not None:
            require_dir(builder_dir, "TFDS builder directory")
            self._data = tfds.builder_from_directory(builder_dir).as_data_source(split=split)
            default_name = os.path.basename(os.path.dirname(os.path.normpath(builder_dir)))
        elif name is not None:
            if data_dir is not None:
                require_dir(data_dir, "TFDS data directory")
            self._data = tfds.data_source(name, data_dir=data_dir, split=split)
            default_name = name.split("/")[0]
        else:
            raise ValueError("give builder_dir or name")
        self.name = source_name or default_name
        self.split = split
        self._to_sample = to_sample
        # A prepared split holds one dataset's samples: its first sample tells the task.
        self.task = self._build(0).task if len(self._data) else None

    def __len__(self):
        return len(self._data)

    def _frame_count(self, index):
        return len(self._build(index).frames)

    def _build(self, index):
        features = self._data[index]
        if self._to_sample is not None:
            return self._to_sample(features, index)
        text = features["sample"]
        try:
            sample = sample_from_json(text.decode("utf-8") if isinstance(text, bytes) else text)
        except (ValueError, TypeError) as err:
            raise BadSample(f"{self.name}[{index}]: stored sample is not a valid Sample JSON: {err}") from err
        frames = list(features.get("frames", []))
        if frames:
            sample.meta["frame_paths"] = sample.frames
            sample.meta["frame_bytes"] = [bytes(f) for f in frames]
            sample.frames = [f"tfds://{self.name}/{self.split}/{index}/{t}" for t in range(len(frames))]
        return sample
