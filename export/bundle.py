"""The exported model bundle as the service sees it: manifest schema, loading and verification.

Torch-free and onnx-free on purpose: the service imports this module to check a bundle before it
opens `model.onnx` with ONNX Runtime.

A bundle directory holds

    model.onnx            the graph: inputs `model.features.inputs.INPUT_NAMES`; outputs `probability` (N,) and,
                          in bundles that have it, `attention` (N, L) (see `ATTENTION_NAME`)
    model.probability.onnx  the same graph with the `probability` output only (bundles that have it): the service runs
                          it for requests without `explain`, so the attention weights are neither computed nor copied
    model.opt.onnx        optional ONNX Runtime-optimised copy (`polarity export --optimize`)
    feature_spec.json     `FeatureSpec.to_dict()` the model was trained with
    vocab/*.json          the training vocabulary (`model.features.vocab.VOCAB_FILES`)
    manifest.json         what the model is plus the sha256 of every other file

`load_manifest` validates the manifest against `MANIFEST_SCHEMA`, checks every file's sha256 and,
given an expectation, that the bundle takes the inputs and feature spec the caller builds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from model.features.inputs import INPUT_NAMES
from model.features.spec import FeatureSpec, SpecError
from model.features.vocab import VOCAB_FILES, Vocabulary

__all__ = [
    "ATTENTION_NAME",
    "FEATURE_SPEC_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "MODEL_FILE",
    "OPTIMIZED_MODEL_FILE",
    "OUTPUT_NAME",
    "PROBABILITY_MODEL_FILE",
    "VOCAB_DIR",
    "BundleError",
    "BundleExpectation",
    "Manifest",
    "check_expectation",
    "load_manifest",
    "sha256_file",
    "verify_bundle",
    "write_manifest",
]

FORMAT = "polarity-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
OPTIMIZED_MODEL_FILE = "model.opt.onnx"
PROBABILITY_MODEL_FILE = "model.probability.onnx"
FEATURE_SPEC_FILE = "feature_spec.json"
VOCAB_DIR = "vocab"
OUTPUT_NAME = "probability"
# Per-candidate weights over the L history positions (N, L) float32, rows summing to 1 over the real
# tokens (0 for an empty history, and 0 on padding). What it is per arch: manifest `model.attention`.
ATTENTION_NAME = "attention"

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_TENSOR = {
    "type": "object",
    "required": ["name", "dtype", "shape"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "dtype": {"enum": ["int64", "float32", "bool"]},
        "shape": {"type": "array", "items": {"anyOf": [{"type": "integer", "minimum": 0},
                                                       {"type": "string", "minLength": 1}]}},
    },
    "additionalProperties": False,
}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Polarity model bundle manifest",
    "type": "object",
    "required": ["format", "format_version", "model", "feature_spec", "feature_spec_file", "vocab_files", "inputs",
                 "outputs", "onnx", "files", "training", "git_revision"],
    "properties": {
        "format": {"const": FORMAT},
        "format_version": {"const": FORMAT_VERSION},
        "model": {
            "type": "object",
            "required": ["name", "version", "created_at", "arch", "seq_variant", "sequence_mode", "seq_len",
                         "pos_ratio", "d_model", "tapf_gates", "config"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "version": {"type": "string", "minLength": 1},
                "created_at": {"type": "string", "minLength": 1},
                "arch": {"type": "string"},
                "seq_variant": {"type": "string"},
                "sequence_mode": {"type": "string"},
                "seq_len": {"type": "integer", "minimum": 1},
                "pos_ratio": {"type": "number", "minimum": 0, "maximum": 1},
                "d_model": {"type": "integer", "minimum": 1},
                "tapf_gates": {"type": "integer", "minimum": 0},
                "config": {"type": "object"},
            },
        },
        "feature_spec": {"type": "object"},
        "feature_spec_file": {"type": "string"},
        "vocab_files": {"type": "object", "additionalProperties": {"type": "string"}},
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
        "outputs": {"type": "array", "items": _TENSOR, "minItems": 1},
        "onnx": {
            "type": "object",
            "required": ["file", "opset", "ir_version", "custom_domains", "optimized_file"],
            "properties": {
                "file": {"type": "string"},
                "opset": {"type": "integer", "minimum": 1},
                "ir_version": {"type": "integer", "minimum": 1},
                "custom_domains": {"type": "object", "additionalProperties": {"type": "integer"}},
                "custom_ops": {"type": "array", "items": {"type": "string"}},
                "functions": {"type": "array", "items": {"type": "string"}},
                "optimized_file": {"type": ["string", "null"]},
                "probability_file": {"type": ["string", "null"]},
            },
        },
        "files": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["sha256", "bytes"],
                "properties": {"sha256": _SHA256, "bytes": {"type": "integer", "minimum": 0}},
                "additionalProperties": False,
            },
        },
        "training": {"type": "object", "required": ["metrics"], "properties": {"metrics": {"type": "object"}}},
        "git_revision": {"type": "string"},
        "parity": {"type": ["object", "null"]},
    },
}


class BundleError(ValueError):
    """A bundle that must not be served; the message says which file or field and why."""


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class BundleExpectation:
    """What the loader (the service) will feed the model; `load_manifest` refuses a bundle that differs.

    feature_spec: the spec the caller assembles sequences with (a `FeatureSpec` or its `to_dict()`),
    None to accept the bundle's own; input_names: the graph's inputs, exactly and in order;
    output_names: the outputs the caller reads (the bundle must have them; extra outputs such as
    `attention` are fine, so a caller that only reads probabilities accepts every bundle).
    """

    feature_spec: FeatureSpec | Mapping[str, Any] | None = None
    input_names: tuple[str, ...] = INPUT_NAMES
    output_names: tuple[str, ...] = (OUTPUT_NAME,)


@dataclass(frozen=True)
class Manifest:
    """A loaded (and, unless asked otherwise, verified) bundle manifest."""

    root: Path
    data: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.data["model"]["name"])

    @property
    def version(self) -> str:
        return str(self.data["model"]["version"])

    @property
    def arch(self) -> str:
        return str(self.data["model"]["arch"])

    @property
    def seq_len(self) -> int:
        return int(self.data["model"]["seq_len"])

    @property
    def tapf_gates(self) -> int:
        return int(self.data["model"]["tapf_gates"])

    @property
    def model_path(self) -> Path:
        return self.root / str(self.data["onnx"]["file"])

    @property
    def optimized_model_path(self) -> Path | None:
        name = self.data["onnx"].get("optimized_file")
        return None if name is None else self.root / str(name)

    @property
    def probability_model_path(self) -> Path | None:
        """The probability-only graph (no `attention` output), when the bundle has one."""
        name = self.data["onnx"].get("probability_file")
        return None if name is None else self.root / str(name)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(str(t["name"]) for t in self.data["inputs"])

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(str(t["name"]) for t in self.data["outputs"])

    @property
    def has_attention(self) -> bool:
        """Whether the graph also outputs `attention` (N, L) (bundles exported before it existed do not)."""
        return ATTENTION_NAME in self.output_names

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec.from_dict(self.data["feature_spec"])

    @property
    def vocab_dir(self) -> Path:
        return self.root / VOCAB_DIR

    def load_vocabulary(self) -> Vocabulary:
        return Vocabulary.load(self.vocab_dir)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path.parent}: no {what} ({path.name}); is this an exported bundle?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: {what} is not valid JSON ({exc})") from None


def validate_manifest_data(data: Any, *, where: str = MANIFEST_FILE) -> None:
    """Raise BundleError unless `data` follows MANIFEST_SCHEMA."""
    try:
        jsonschema.validate(data, MANIFEST_SCHEMA)
    except jsonschema.ValidationError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise BundleError(f"{where}: invalid manifest at {at}: {exc.message}") from None


def write_manifest(bundle_dir: Path, data: dict[str, Any]) -> Path:
    """Validate and write manifest.json (the exporter's side)."""
    validate_manifest_data(data)
    path = Path(bundle_dir) / MANIFEST_FILE
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def verify_bundle(bundle: Path | str | Manifest) -> None:
    """Check every file the manifest lists against its size and sha256; BundleError on any mismatch."""
    manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle, verify=False)
    root = manifest.root
    required = {manifest.data["onnx"]["file"], manifest.data["feature_spec_file"],
                *manifest.data["vocab_files"].values()}
    for optional in ("optimized_file", "probability_file"):
        if manifest.data["onnx"].get(optional):
            required.add(manifest.data["onnx"][optional])
    unlisted = sorted(required - set(manifest.data["files"]))
    if unlisted:
        raise BundleError(f"{root}: manifest lists no sha256 for {unlisted}; the manifest is incomplete")
    for rel, entry in sorted(manifest.data["files"].items()):
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(f"{root}: manifest file entry {rel!r} points outside the bundle")
        if not path.is_file():
            raise BundleError(f"{root}: {rel} is missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"{root}: {rel} is {size} bytes but the manifest says {entry['bytes']}: "
                              "the file was modified after export; re-export the bundle")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleError(f"{root}: sha256 mismatch for {rel}: file has {digest}, manifest says "
                              f"{entry['sha256']}: the file was modified after export; re-export the bundle")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def spec_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two feature-spec dicts (`FeatureSpec.to_dict()`)."""
    a, b = _flatten(expected), _flatten(actual)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            diffs.append(f"{key}: expected {a.get(key, '<missing>')!r}, bundle has {b.get(key, '<missing>')!r}")
    return diffs


def check_expectation(manifest: Manifest, expect: BundleExpectation) -> None:
    """Refuse (BundleError) a loaded bundle whose inputs, outputs or feature spec differ from `expect`."""
    where = manifest.root
    if tuple(expect.input_names) != manifest.input_names:
        raise BundleError(f"{where}: graph inputs are {list(manifest.input_names)}, the caller feeds "
                          f"{list(expect.input_names)}")
    missing = [name for name in expect.output_names if name not in manifest.output_names]
    if missing:
        raise BundleError(f"{where}: graph outputs are {list(manifest.output_names)}, the caller reads "
                          f"{list(expect.output_names)} (missing {missing})")
    if expect.feature_spec is not None:
        want_spec = expect.feature_spec.to_dict() if isinstance(expect.feature_spec, FeatureSpec) \
            else dict(expect.feature_spec)
        diffs = spec_differences(want_spec, manifest.data["feature_spec"])
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise BundleError(f"{where}: feature spec mismatch: {shown}")


def load_manifest(bundle_dir: Path | str, *, expect: BundleExpectation | None = None,
                  verify: bool = True) -> Manifest:
    """Read and validate `bundle_dir/manifest.json`.

    verify: check the sha256 of every listed file (`verify_bundle`); expect: refuse a bundle whose
    graph inputs/outputs or feature spec differ from what the caller will feed it.
    Raises BundleError with a message that names the bundle, the file and the problem.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    data = _read_json(root / MANIFEST_FILE, "manifest")
    validate_manifest_data(data, where=str(root / MANIFEST_FILE))
    manifest = Manifest(root, data)
    try:
        spec = manifest.feature_spec
    except (SpecError, TypeError) as exc:
        raise BundleError(f"{root}: manifest feature_spec is not a valid FeatureSpec: {exc}") from None
    if spec.sequence.seq_len != manifest.seq_len:
        raise BundleError(f"{root}: manifest model.seq_len={manifest.seq_len} but its feature spec says "
                          f"seq_len={spec.sequence.seq_len}")
    missing_vocab = sorted(set(VOCAB_FILES) - {Path(p).name for p in data["vocab_files"].values()})
    if missing_vocab:
        raise BundleError(f"{root}: manifest lists no vocabulary file(s) {missing_vocab}")
    if verify:
        verify_bundle(manifest)
        file_spec = _read_json(root / data["feature_spec_file"], "feature spec")
        diffs = spec_differences(data["feature_spec"], file_spec)
        if diffs:
            raise BundleError(f"{root}: {data['feature_spec_file']} disagrees with the manifest: {diffs[0]}")
    if expect is not None:
        check_expectation(manifest, expect)
    return manifest
