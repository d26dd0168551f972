"""Latent and text cache: Wan VAE latents and UMT5 embeddings, computed once, stored beside the dataset.

Training then holds neither the VAE (127M) nor the UMT5-XXL encoder (5.7B, ~11 GB in bf16).

    DATASET/.fwmodel_cache/<T>x<H>x<W>-s<stride>-<window>/
        cache.json                  provenance: encoders (path, config, random or not), latent
                                    convention, the clip spec, one entry per sample
        latents/<id>.safetensors    "latents" [16, S, H/8, W/8] (normalised: (mode - mean) / std)
        text/<sha>.safetensors      "text" [512, text_dim]: one file per distinct prompt

Conventions (recorded in cache.json): latents are the posterior *mode* of the Wan VAE, normalised
per channel with the VAE's `latents_mean` / `latents_std`; text is tokenised to 512 tokens, encoded
with the attention mask, then cut to its true length and zero-padded back to 512 (what the Wan
pipelines do; the DiT never receives a mask). Each sample's entry records a fingerprint of its
metadata record, so a rebuilt sample is not served stale latents. Files are written atomically and
finished samples are skipped on rerun.

`write_tiny_encoders(dir, text_dim)` writes a tiny *random* VAE and UMT5 (+ a character tokenizer) in
the Wan repository layout (vae/, text_encoder/, tokenizer/) for tests and demos; caches made with
them are marked random_init. `random-tiny` as the VAE or text-encoder path (`fwmodel cache --vae
random-tiny --text-encoder random-tiny`, or model.vae / model.text_encoder) builds the same tiny
random models in memory from their configs (seeded, nothing downloaded or written), like
`fwdata build --depth-model random-tiny`; the cache records them as random_init.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fwdata import __version__
from fwdata.dataset.layout import DERIVED_DIRS
from fwdata.dataset.contract import SampleRecord
from fwdata.textout import plural
from fwmodel.config import WAN_TEXT_LEN
from fwmodel.data import (
    ClipSpec,
    DataConfig,
    DataError,
    ResizePlan,
    load_frames,
    record_fingerprint,
    select_samples,
    window_start,
)

CACHE_DIRNAME = DERIVED_DIRS[0]  # fwdata.dataset.layout: validation knows it is not an orphan
CACHE_FORMAT = "fwmodel-latent-cache"
CACHE_VERSION = 1
RANDOM_MARKER = "FWMODEL_TINY_RANDOM.json"
RANDOM_TINY = "random-tiny"  # --vae / --text-encoder: a tiny random model built in memory (tests, demos)
RANDOM_TINY_SEED = 0


class CacheError(DataError):
    """The cache is missing, stale or does not fit the run; the message says what to do."""


def cache_root(dataset: Path, cache_dir: Optional[Path] = None) -> Path:
    return Path(cache_dir) if cache_dir is not None else Path(dataset) / CACHE_DIRNAME


def cache_path(dataset: Path, spec: ClipSpec, cache_dir: Optional[Path] = None) -> Path:
    return cache_root(dataset, cache_dir) / spec.key


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- encoders


def _component_dir(path: Path, subfolder: str, what: str) -> Path:
    """`path/subfolder` for a Wan repository root, else `path` itself; both must hold config.json."""
    path = Path(path).expanduser()
    if (path / subfolder / "config.json").is_file():
        return path / subfolder
    if (path / "config.json").is_file():
        return path
    raise CacheError(
        f"{what} not found at {path}: expected a diffusers-format Wan repository (with {subfolder}/config.json) "
        f"or the {subfolder} folder itself; download e.g. `hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers "
        f"--local-dir {path}`, or pass `{RANDOM_TINY}` for a tiny randomly initialised model (tests and demos: "
        "its output means nothing)."
    )


def _tokenizer_dir(text_encoder_dir: Path) -> Path:
    for candidate in (text_encoder_dir.parent / "tokenizer", text_encoder_dir):
        if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    raise CacheError(f"no tokenizer beside {text_encoder_dir} (looked in ../tokenizer and the folder itself)")


def _is_random(directory: Path) -> bool:
    return (directory / RANDOM_MARKER).is_file() or (directory.parent / RANDOM_MARKER).is_file()


def is_random_tiny(path) -> bool:
    """True when an encoder path is the `random-tiny` label (a tiny random model built in memory)."""
    return path is not None and str(path) == RANDOM_TINY


def is_random_encoder(path) -> bool:
    """True for `random-tiny` and for folders written by `write_tiny_encoders`."""
    if path is None:
        return False
    if is_random_tiny(path):
        return True
    path = Path(path).expanduser()
    return _is_random(path) or any(_is_random(path / sub) for sub in ("vae", "text_encoder"))


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,-"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _tiny_umt5(vocab_size: int, text_dim: int, d_ff: Optional[int] = None):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size, d_model=text_dim, d_kv=8, d_ff=d_ff or 2 * text_dim, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
    )
    return UMT5EncoderModel(config)


def _tiny_d_ff(text_dim: int) -> int:
    """Feed-forward width of the random-tiny UMT5: 2 x text_dim, at most 64 (a 4096-wide one stays small)."""
    return min(2 * text_dim, 64)


def random_tiny_encoders(text_dim: int = 16, seed: int = RANDOM_TINY_SEED):
    """(vae, tokenizer, text encoder): the tiny random models of `write_tiny_encoders(dir, text_dim, seed)`,
    built in memory from their configs (the same weights for text_dim <= 32), without touching the
    global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _tiny_vae()
        tokenizer = _tiny_tokenizer()
        text = _tiny_umt5(len(tokenizer.get_vocab()), text_dim, _tiny_d_ff(text_dim))
    return vae.eval(), tokenizer, text.eval()


def _random_tiny_provenance(seed: int) -> dict:
    return {"path": RANDOM_TINY, "seed": seed,
            "built": "in memory from a config, randomly initialised (no download): its output means nothing"}


class VideoEncoder:
    """Wan VAE: video [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 16, S, H/8, W/8] (posterior mode)."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKLWan

        self.random_tiny = is_random_tiny(path)
        if self.random_tiny:
            self.dir = None
            self.vae = random_tiny_encoders(seed=RANDOM_TINY_SEED)[0]
            if dtype != torch.float32:
                self.vae.to(dtype=dtype)
        else:
            self.dir = _component_dir(path, "vae", "Wan VAE")
            try:
                self.vae = AutoencoderKLWan.from_pretrained(self.dir, torch_dtype=dtype, local_files_only=True)
            except (OSError, ValueError) as err:
                raise CacheError(f"could not load the Wan VAE from {self.dir} ({err})") from err
        self.vae.to(device).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        cfg = self.vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
        return (posterior.mode().float() - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, S, H/8, W/8] (as __call__ returns) -> video [B, 3, T, H, W] in [-1, 1], float32.

        Un-normalises with the VAE's latents_mean / latents_std (z = latents * std + mean), as Wan's pipelines do."""
        z = latents.to(self.device, torch.float32) * self.std.to(self.device) + self.mean.to(self.device)
        video = self.vae.decode(z.to(self.dtype), return_dict=False)[0]
        return video.float().clamp(-1.0, 1.0)

    def provenance(self) -> dict:
        info = {
            "path": str(self.dir),
            "class": type(self.vae).__name__,
            "config": {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")},
            "latent": "posterior mode, (z - latents_mean) / latents_std per channel",
            "random_init": self.random_tiny or _is_random(self.dir),
        }
        if self.random_tiny:
            info.update(_random_tiny_provenance(RANDOM_TINY_SEED))
        return info


class TextEncoder:
    """UMT5 encoder: prompts -> [B, 512, d_model], cut to each prompt's length and zero-padded to 512."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype = torch.float32, text_dim: int = 16):
        """`text_dim` is the width of the `random-tiny` encoder (the model preset's text_dim); a real
        encoder has its own."""
        from transformers import AutoTokenizer, UMT5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.random_tiny = is_random_tiny(path)
        if self.random_tiny:
            self.dir = self.tokenizer_dir = None
            _, self.tokenizer, self.model = random_tiny_encoders(text_dim, RANDOM_TINY_SEED)
            self.model.to(dtype=dtype)
        else:
            self.dir = _component_dir(path, "text_encoder", "UMT5 text encoder")
            self.tokenizer_dir = _tokenizer_dir(self.dir)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
                self.model = UMT5EncoderModel.from_pretrained(self.dir, dtype=dtype, local_files_only=True)
            except (OSError, ValueError) as err:
                raise CacheError(f"could not load the UMT5 text encoder from {self.dir} ({err})") from err
        self.model.to(device).eval().requires_grad_(False)
        self.device = device

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=WAN_TEXT_LEN, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.model(ids, attention_mask=mask).last_hidden_state.float()
        return hidden * mask[..., None].to(hidden.dtype)  # zero beyond each prompt's true length

    def provenance(self) -> dict:
        info = {
            "path": str(self.dir),
            "tokenizer": str(self.tokenizer_dir),
            "class": type(self.model).__name__,
            "d_model": self.dim,
            "max_length": WAN_TEXT_LEN,
            "padding": "cut to the true length, zero-padded to 512",
            "random_init": self.random_tiny or _is_random(self.dir),
        }
        if self.random_tiny:
            info.update(_random_tiny_provenance(RANDOM_TINY_SEED), tokenizer=f"{RANDOM_TINY} (characters)",
                        config={k: v for k, v in self.model.config.to_dict().items()
                                if k in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size")})
        return info


def write_tiny_encoders(directory: Path, text_dim: int = 16, seed: int = 0) -> Path:
    """A tiny random Wan VAE and UMT5 (with a character tokenizer) in the Wan repository layout.

    For tests and demos only: the latents and embeddings mean nothing. Returns `directory`.
    """
    directory = Path(directory)
    if (directory / RANDOM_MARKER).is_file():
        return directory
    torch.manual_seed(seed)
    _tiny_vae().save_pretrained(directory / "vae")
    tokenizer = _tiny_tokenizer()
    tokenizer.save_pretrained(directory / "tokenizer")
    _tiny_umt5(len(tokenizer.get_vocab()), text_dim).save_pretrained(directory / "text_encoder")
    (directory / RANDOM_MARKER).write_text(json.dumps({"random_init": True, "text_dim": text_dim, "seed": seed}))
    return directory


# --------------------------------------------------------------------------- reading a cache


class LatentCache:
    """A finished cache for one clip spec (see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        manifest = self.dir / "cache.json"
        try:
            self.info = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise CacheError(f"latent cache {self.dir} is unreadable ({err}); delete it and run `fwmodel cache` again") from None
        if self.info.get("format") != CACHE_FORMAT:
            raise CacheError(f"{manifest} is not an fwmodel latent cache")
        self.samples: dict = self.info.get("samples", {})

    @classmethod
    def find(cls, cfg: DataConfig) -> Optional["LatentCache"]:
        """The cache matching `cfg` (root, frames, size, stride, window), or None when there is none."""
        directory = cache_path(cfg.root, cfg.clip_spec(), cfg.cache_dir)
        return cls(directory) if (directory / "cache.json").is_file() else None

    @property
    def text_dim(self) -> int:
        return int(self.info["text_encoder"]["d_model"])

    @property
    def random_init(self) -> bool:
        return bool(self.info["vae"].get("random_init") or self.info["text_encoder"].get("random_init"))

    def check_covers(self, records: Sequence[SampleRecord], text_dim: Optional[int]) -> None:
        missing = [r.id for r in records if r.id not in self.samples]
        stale = [r.id for r in records if r.id in self.samples and self.samples[r.id]["record"] != record_fingerprint(r)]
        command = f"fwmodel cache {self.info.get('dataset', 'DATASET')} --vae PATH --text-encoder PATH"
        if missing:
            raise CacheError(
                f"latent cache {self.dir} lacks {len(missing)} of the {len(records)} training samples "
                f"(e.g. {missing[0]}); run `{command}` to add them, or set data.cache = \"off\"."
            )
        if stale:
            raise CacheError(
                f"latent cache {self.dir} is stale for {plural(len(stale), 'sample')} (e.g. {stale[0]}: the dataset sample "
                f"changed since it was cached); run `{command}` again."
            )
        if text_dim is not None and self.text_dim != text_dim:
            raise CacheError(
                f"latent cache {self.dir} holds text embeddings of width {self.text_dim}, but the model expects "
                f"{text_dim}: it was made with another text encoder; re-run `fwmodel cache` with the matching one."
            )

    def window_start(self, sample_id: str) -> int:
        return int(self.samples[sample_id]["window_start"])

    def load(self, sample_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.samples[sample_id]
        try:
            with safe_open(str(self.dir / entry["latents"]), framework="pt") as f:
                latents = f.get_tensor("latents").float()
            with safe_open(str(self.dir / entry["text"]), framework="pt") as f:
                text = f.get_tensor("text").float()
        except Exception as err:  # damaged or missing file
            raise CacheError(
                f"cache files of sample {sample_id} in {self.dir} are unreadable ({err}); run `fwmodel cache` again"
            ) from None
        return latents, text


# --------------------------------------------------------------------------- building a cache


@dataclass
class CacheOptions:
    dataset: Path
    vae: Path
    text_encoder: Path
    data: DataConfig  # frames, size, stride, window, split, gated-out, prompt
    captions: Optional[Path] = None  # JSON {sample id: prompt}; others get data.prompt
    device: str = "auto"
    encoder_dtype: str = "float32"  # bfloat16 on GPUs
    storage_dtype: str = "bfloat16"
    text_dim: int = 16  # width of a `random-tiny` text encoder (the model preset's text_dim)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _atomic_save(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def build_cache(opts: CacheOptions, progress: Optional[Callable[[str, int, int], None]] = None) -> Path:
    """Encode every selected sample (skipping finished ones); returns the cache folder.

    `progress(sample_id, n, total)` is called with ("", 0, total) before the first sample to encode
    (total: the samples this run encodes) and with (id, n, total) after the n-th."""
    data = opts.data.model_copy(update={"root": Path(opts.dataset), "max_samples": None})
    spec = data.clip_spec()
    if spec.window == "random":
        raise CacheError('data.window = "random" cannot be cached (the window changes every epoch); use "start" or "center"')
    selection = select_samples(data.root, data)
    captions = {}
    if opts.captions is not None:
        try:
            captions = json.loads(Path(opts.captions).read_text())
        except (OSError, ValueError) as err:
            raise CacheError(f"captions file {opts.captions} is unreadable ({err}); it must be JSON {{sample id: text}}") from None
    directory = cache_path(data.root, spec, data.cache_dir)
    manifest_path = directory / "cache.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    done: dict = manifest.get("samples", {})

    device = _device(opts.device)
    dtype = _DTYPES[opts.encoder_dtype]
    storage = _DTYPES[opts.storage_dtype]
    vae = VideoEncoder(opts.vae, device, dtype)
    text_encoder = TextEncoder(opts.text_encoder, device, dtype, text_dim=opts.text_dim)
    if manifest and manifest.get("text_encoder", {}).get("d_model") != text_encoder.dim:
        raise CacheError(f"{directory} was made with another text encoder; delete it or pass the same --text-encoder")
    for what, option, encoder in (("VAE", "--vae", vae), ("text encoder", "--text-encoder", text_encoder)):
        before = manifest.get("vae" if what == "VAE" else "text_encoder")
        if before and bool(before.get("random_init")) != bool(encoder.provenance()["random_init"]):
            kinds = {True: "a randomly initialised", False: "a real (pretrained)"}
            raise CacheError(
                f"{directory} was made with {kinds[bool(before.get('random_init'))]} {what} ({before.get('path')}), "
                f"not {kinds[bool(encoder.provenance()['random_init'])]} one: mixing them would mislabel the cache; "
                f"delete the folder or pass the same {option}"
            )

    def write_manifest() -> None:
        info = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "tool_version": __version__,
            "created": manifest.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": str(data.root),
            "spec": {"num_frames": spec.num_frames, "height": spec.height, "width": spec.width,
                     "frame_stride": spec.frame_stride, "window": spec.window},
            "storage_dtype": opts.storage_dtype,
            "encoder_dtype": opts.encoder_dtype,
            "vae": vae.provenance(),
            "text_encoder": text_encoder.provenance(),
            "samples": done,
        }
        tmp = manifest_path.with_name(f".cache.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(info, indent=2, default=str))
        os.replace(tmp, manifest_path)

    directory.mkdir(parents=True, exist_ok=True)
    todo = [r for r in selection.records if done.get(r.id, {}).get("record") != record_fingerprint(r)]
    if progress:
        progress("", 0, len(todo))
    for n, record in enumerate(todo):
        start = window_start(record.num_frames, spec)
        indices = list(range(start, start + spec.span, spec.frame_stride))
        plan = ResizePlan.cover((record.height, record.width), (spec.height, spec.width))
        video = load_frames(data.root, record, indices, plan)[None]
        latents = vae(video)[0]
        prompt = captions.get(record.id, data.prompt)
        text_file = f"text/{prompt_key(prompt)}.safetensors"
        if not (directory / text_file).is_file():
            _atomic_save({"text": text_encoder([prompt])[0].to(storage)}, directory / text_file, {"prompt": prompt[:2000]})
        latent_file = f"latents/{record.id}.safetensors"
        _atomic_save({"latents": latents.to(storage)}, directory / latent_file)
        done[record.id] = {
            "latents": latent_file,
            "text": text_file,
            "window_start": start,
            "frames": indices,
            "record": record_fingerprint(record),
            "latent_shape": list(latents.shape),
        }
        write_manifest()
        if progress:
            progress(record.id, n + 1, len(todo))
    if not todo:
        write_manifest()
    return directory
