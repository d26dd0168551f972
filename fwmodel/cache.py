"""Latent and text cache: Wan VAE latents and UMT5 embeddings, computed once, stored beside the dataset.

Training then holds neither the VAE (127M) nor the UMT5-XXL encoder (5.7B, ~11 GB in bf16).

    DATASET/.fwmodel_cache/<T>x<H>x<W>-s<stride>-<window>/
        cache.json                  provenance: encoders (path, config, random or not), latent
                                    convention, the clip spec, one entry per sample
        latents/<id>.safetensors    "latents" [16, S, H/8, W/8] (normalised: (mode - mean) / std)
        text/<sha>.safetensors      "text" [512, text_dim]: one file per distinct prompt
        i2v/<id>.safetensors        only with an image encoder (`--image-encoder`, image-to-video presets):
                                    "condition_latents" [16, S, H/8, W/8], the VAE latent of [first frame,
                                    T-1 black frames] (fwmodel.i2v.first_frame_latent; the 4-channel mask is
                                    rebuilt at load), and "image_embeds" [N, image_dim], the CLIP tokens of
                                    the first frame of the sample's window (after the latents' resize)

Conventions (recorded in cache.json): latents are the posterior *mode* of the Wan VAE, normalised
per channel with the VAE's `latents_mean` / `latents_std`; text is tokenised to 512 tokens, encoded
with the attention mask, then cut to its true length and zero-padded back to 512 (what the Wan
pipelines do; the DiT never receives a mask). Each sample's entry records a fingerprint of its
metadata record, so a rebuilt sample is not served stale latents. Files are written atomically and
finished samples are skipped on rerun.

On WebDataset shards (`fwmodel cache SHARDS`, SHARDS holding shards.json) the same entries are written as
tar shards matching the data shards (`build_shard_cache`, `ShardedLatentCache`; the layout is described
at "the cache as tar shards" below), so a cluster ships shards only.

`write_tiny_encoders(dir, text_dim)` writes a tiny *random* VAE and UMT5 (+ a character tokenizer) in
the Wan repository layout (vae/, text_encoder/, tokenizer/) for tests and demos; caches made with
them are marked random_init. `random-tiny` as the VAE or text-encoder path (`fwmodel cache --vae
random-tiny --text-encoder random-tiny`, or model.vae / model.text_encoder) builds the same tiny
random models in memory from their configs (seeded, nothing downloaded or written), like
`fwdata build --depth-model random-tiny`; the cache records them as random_init. The same holds for
the CLIP image encoder (`--image-encoder random-tiny`, fwmodel.i2v); cache.json then records it as
"image_encoder". Without an image encoder nothing of the I2V part is written (a T2V cache's bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save, save_file

from fwdata import __version__
from fwdata.dataset.layout import DERIVED_DIRS
from fwdata.dataset.contract import SampleRecord
from fwdata.shards.format import ShardInfo
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
    """The cache is missing, stale or does not fit the run; the message says what to do (one line; from a
    DataLoader worker too, see `DataError`)."""


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
    return _is_random(path) or any(_is_random(path / sub) for sub in ("vae", "text_encoder", "image_encoder"))


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
        """The cache matching `cfg` (root, frames, size, stride, window), or None when there is none: a
        folder cache (cache.json), or a sharded one (`ShardedLatentCache`, its index cache-shards.json; the
        root may then be a URL)."""
        from fwmodel.shard_data import location_exists, location

        directory = cache_path(cfg.root, cfg.clip_spec(), cfg.cache_dir)
        if (directory / "cache.json").is_file():
            return LatentCache(directory)
        if location_exists(location(directory), SHARD_CACHE_INDEX):
            return ShardedLatentCache(directory)
        return None

    @property
    def text_dim(self) -> int:
        return int(self.info["text_encoder"]["d_model"])

    #: True once `check_i2v` passed: `load_i2v` then serves each sample's condition and image tokens
    i2v = False

    @property
    def random_init(self) -> bool:
        return bool(self.info["vae"].get("random_init") or self.info["text_encoder"].get("random_init")
                    or (self.info.get("image_encoder") or {}).get("random_init"))

    def has_i2v(self, sample_id: str) -> bool:
        """True when the entry of `sample_id` holds the I2V condition latent and image tokens."""
        return "i2v" in self.samples[sample_id]

    def check_i2v(self, records: Sequence[SampleRecord], image_dim: int) -> None:
        """For an image-to-video run: CacheError (one line) unless the cache was made with an image encoder of
        width `image_dim` and holds the I2V part of every record; then `load_i2v` serves them (self.i2v)."""
        command = (f"fwmodel cache {self.info.get('dataset', 'DATASET')} --vae PATH --text-encoder PATH "
                   "--image-encoder PATH")
        image = self.info.get("image_encoder")
        if not image:
            raise CacheError(f"latent cache {self.dir} has no first-frame condition or CLIP image tokens (made "
                             f"without --image-encoder), which an image-to-video preset needs; rerun `{command}`")
        if int(image.get("hidden_size", -1)) != image_dim:
            raise CacheError(f"latent cache {self.dir} holds CLIP image tokens of width {image.get('hidden_size')}, "
                             f"but the model expects {image_dim}: rerun `{command}` with the matching image encoder")
        missing = [r.id for r in records if not self.has_i2v(r.id)]
        if missing:
            raise CacheError(f"latent cache {self.dir} lacks the first-frame condition of {len(missing)} of the "
                             f"{len(records)} training samples (e.g. {missing[0]}); rerun `{command}`")
        self.i2v = True

    def load_i2v(self, sample_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition [20, S, Hl, Wl], image_embeds [N, image_dim]) of one sample, fp32 (fwmodel.i2v.with_mask)."""
        from fwmodel.i2v import with_mask

        try:
            with safe_open(str(self.dir / self.samples[sample_id]["i2v"]), framework="pt") as f:
                latent, image = f.get_tensor("condition_latents").float(), f.get_tensor("image_embeds").float()
        except Exception as err:  # damaged or missing file
            raise CacheError(f"I2V cache file of sample {sample_id} in {self.dir} is unreadable ({err}); run "
                             "`fwmodel cache ... --image-encoder PATH` again") from None
        return with_mask(latent), image

    def check_covers(self, records: Sequence[SampleRecord], text_dim: Optional[int]) -> None:
        missing = [r.id for r in records if r.id not in self.samples]
        stale = [r.id for r in records if r.id in self.samples and self.samples[r.id]["record"] != record_fingerprint(r)]
        command = f"fwmodel cache {self.info.get('dataset', 'DATASET')} --vae PATH --text-encoder PATH" + (
            " --image-encoder PATH" if self.info.get("image_encoder") else "")
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
    image_encoder: Optional[Path] = None  # CLIP (fwmodel.i2v.ImageEncoder): also cache the I2V condition
    image_dim: int = 16  # width of a `random-tiny` image encoder (the preset's image_dim)


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


def _cache_spec(opts: CacheOptions) -> tuple[DataConfig, ClipSpec]:
    """The data config of a cache run (root = the dataset, every selected sample) and its clip spec."""
    data = opts.data.model_copy(update={"root": Path(opts.dataset), "max_samples": None})
    spec = data.clip_spec()
    if spec.window == "random":
        raise CacheError('data.window = "random" cannot be cached (the window changes every epoch); use "start" or "center"')
    return data, spec


def _read_captions(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"captions file {path} is unreadable ({err}); it must be JSON {{sample id: text}}") from None


def _encoders(opts: CacheOptions) -> tuple["VideoEncoder", "TextEncoder"]:
    device = _device(opts.device)
    dtype = _DTYPES[opts.encoder_dtype]
    return (VideoEncoder(opts.vae, device, dtype),
            TextEncoder(opts.text_encoder, device, dtype, text_dim=opts.text_dim))


def _image_encoder(opts: CacheOptions):
    """The CLIP image encoder of `opts` (fwmodel.i2v.ImageEncoder), or None without --image-encoder; its
    ImageEncoderError becomes a CacheError (one line)."""
    from fwmodel.i2v import ImageEncoder, ImageEncoderError

    if opts.image_encoder is None:
        return None
    try:
        return ImageEncoder(opts.image_encoder, _device(opts.device), _DTYPES[opts.encoder_dtype], opts.image_dim)
    except ImageEncoderError as err:
        raise CacheError(str(err)) from None


def _check_same_image_encoder(before: dict, directory: Path, image_encoder) -> None:
    """CacheError when the existing cache (provenance `before`) was made with an image encoder and this run
    has none, or one of another width, or random where that one was real (or the reverse)."""
    was = (before or {}).get("image_encoder")
    if not was:
        return
    if image_encoder is None:
        raise CacheError(f"{directory} was made with --image-encoder ({was.get('path')}): pass it again (its "
                         "new samples need the I2V condition too), or delete the folder")
    now = image_encoder.provenance()
    if was.get("hidden_size") != now["hidden_size"] or bool(was.get("random_init")) != bool(now["random_init"]):
        raise CacheError(f"{directory} was made with another image encoder ({was.get('path')}, width "
                         f"{was.get('hidden_size')}): delete the folder or pass the same --image-encoder")


def _check_same_encoders(before: dict, directory: Path, vae: "VideoEncoder", text_encoder: "TextEncoder") -> None:
    """CacheError when the existing cache (its provenance `before`: cache.json or the shard cache index) was
    made with a text encoder of another width, or with random where these are real (or the reverse)."""
    if before and before.get("text_encoder", {}).get("d_model") != text_encoder.dim:
        raise CacheError(f"{directory} was made with another text encoder; delete it or pass the same --text-encoder")
    for what, option, encoder in (("VAE", "--vae", vae), ("text encoder", "--text-encoder", text_encoder)):
        was = before.get("vae" if what == "VAE" else "text_encoder")
        if was and bool(was.get("random_init")) != bool(encoder.provenance()["random_init"]):
            kinds = {True: "a randomly initialised", False: "a real (pretrained)"}
            raise CacheError(
                f"{directory} was made with {kinds[bool(was.get('random_init'))]} {what} ({was.get('path')}), "
                f"not {kinds[bool(encoder.provenance()['random_init'])]} one: mixing them would mislabel the cache; "
                f"delete the folder or pass the same {option}"
            )


def _encode_sample(record: SampleRecord, source, spec: ClipSpec, vae: "VideoEncoder",
                   image_encoder=None) -> tuple[int, list[int], torch.Tensor, Optional[dict]]:
    """(window start, clip frame indices, latents [16, S, H/8, W/8], I2V part) of one sample; `source` is the
    dataset root, or a MemorySource of the sample's shard members. The I2V part (None without
    `image_encoder`) is {"condition_latents": [16, S, H/8, W/8], "image_embeds": [N, image_dim]} of the
    window's first frame, resized like the latents (`encode_i2v`)."""
    start = window_start(record.num_frames, spec)
    indices = list(range(start, start + spec.span, spec.frame_stride))
    plan = ResizePlan.cover((record.height, record.width), (spec.height, spec.width))
    video = load_frames(source, record, indices, plan)[None]
    i2v = encode_i2v(video, vae, image_encoder) if image_encoder is not None else None
    return start, indices, vae(video)[0], (None if i2v is None else {k: v[0] for k, v in i2v.items()})


def encode_i2v(video: torch.Tensor, vae: "VideoEncoder", image_encoder) -> dict[str, torch.Tensor]:
    """The I2V part of clips [B, 3, T, H, W] in [-1, 1]: {"condition_latents": [B, 16, S, H/8, W/8] (the
    first frame's `fwmodel.i2v.first_frame_latent`), "image_embeds": [B, N, image_dim]} (fp32). The one
    encoding of the cache and of the trainer's online path."""
    from fwmodel.i2v import first_frame_latent

    first = video[:, :, 0]
    return {"condition_latents": first_frame_latent(vae, first, video.shape[2]), "image_embeds": image_encoder(first)}


def build_cache(opts: CacheOptions, progress: Optional[Callable[[str, int, int], None]] = None) -> Path:
    """Encode every selected sample (skipping finished ones); returns the cache folder. On WebDataset
    shards (`opts.dataset` holds shards.json) the cache is written as tar shards (`build_shard_cache`).

    `progress(sample_id, n, total)` is called with ("", 0, total) before the first sample to encode
    (total: the samples this run encodes) and with (id, n, total) after the n-th."""
    from fwmodel.shard_data import check_not_incomplete, is_shard_root

    check_not_incomplete(opts.dataset)
    if is_shard_root(opts.dataset):
        return build_shard_cache(opts, progress)
    data, spec = _cache_spec(opts)
    selection = select_samples(data.root, data)
    captions = _read_captions(opts.captions)
    directory = cache_path(data.root, spec, data.cache_dir)
    if (directory / SHARD_CACHE_INDEX).is_file():
        raise CacheError(f"{directory} holds a sharded latent cache ({SHARD_CACHE_INDEX}); pass another --cache-dir "
                         "for the folder one")
    manifest_path = directory / "cache.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    done: dict = manifest.get("samples", {})

    storage = _DTYPES[opts.storage_dtype]
    vae, text_encoder = _encoders(opts)
    _check_same_encoders(manifest, directory, vae, text_encoder)
    image_encoder = _image_encoder(opts)
    _check_same_image_encoder(manifest, directory, image_encoder)

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
            **({"image_encoder": image_encoder.provenance()} if image_encoder is not None else {}),
            "samples": done,
        }
        tmp = manifest_path.with_name(f".cache.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(info, indent=2, default=str))
        os.replace(tmp, manifest_path)

    directory.mkdir(parents=True, exist_ok=True)
    todo = [r for r in selection.records if done.get(r.id, {}).get("record") != record_fingerprint(r)
            or (image_encoder is not None and "i2v" not in done[r.id])]
    if progress:
        progress("", 0, len(todo))
    for n, record in enumerate(todo):
        start, indices, latents, i2v = _encode_sample(record, data.root, spec, vae, image_encoder)
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
        if i2v is not None:
            i2v_file = f"i2v/{record.id}.safetensors"
            _atomic_save({k: v.to(storage) for k, v in i2v.items()}, directory / i2v_file)
            done[record.id]["i2v"] = i2v_file
        write_manifest()
        if progress:
            progress(record.id, n + 1, len(todo))
    if not todo:
        write_manifest()
    return directory


# --------------------------------------------------------------------------- the cache as tar shards
#
#     <cache root>/<T>x<H>x<W>-s<stride>-<window>/     (default root: SHARDS/.fwmodel_cache)
#         cache-shards.json       ShardCacheIndex: the folder cache's provenance keys (vae, text_encoder,
#                                 spec, dtypes), the data shards it matches, one ShardInfo per cache
#                                 shard (bytes, sha256) and one entry per sample (key, shard, window,
#                                 record fingerprint, sha256 of its members)
#         shard-000000.tar ...    one per data shard holding cached samples, with the data shard's name;
#                                 WebDataset samples with the data sample's key (%08d), in key order,
#                                 members latents.safetensors ("latents" [16, S, H/8, W/8]) and
#                                 text.safetensors ("text" [512, text_dim], metadata "prompt"): the
#                                 bytes of the folder cache's latents/<id> and text/<sha> files; with an
#                                 image encoder also i2v.safetensors (the folder cache's i2v/<id>), and
#                                 the index then records "image_encoder"
#
# The trainer streams cache shard N beside data shard N (fwmodel.shard_data): one open tar each, read
# forward, so the sample order, ranks, workers and resume position are the data stream's.

SHARD_CACHE_INDEX = "cache-shards.json"
SHARD_CACHE_FORMAT = "fwmodel-latent-cache-shards"
LATENTS_MEMBER = "latents.safetensors"
TEXT_MEMBER = "text.safetensors"
I2V_MEMBER = "i2v.safetensors"
CACHE_MEMBERS = (LATENTS_MEMBER, TEXT_MEMBER)  # of every entry; I2V_MEMBER too where its sha256 is listed


class ShardCacheEntry(BaseModel):
    """One sample of a sharded cache (keys as the folder cache's cache.json entries, plus where it is)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(pattern=r"^\d{8}$", description="the data sample's WebDataset key (manifest index, %08d)")
    shard: str = Field(pattern=r"^shard-\d{6}\.tar$", description="the data shard (and cache shard) holding it")
    window_start: int = Field(ge=0)
    frames: list[int]
    record: str = Field(description="fingerprint of the sample's record (fwmodel.data.record_fingerprint)")
    prompt: str = Field(description="prompt_key of the encoded prompt")
    latent_shape: list[int]
    sha256: dict[str, str] = Field(description="member -> sha256 of its bytes (checked when it is read)")


class ShardCacheIndex(BaseModel):
    """`cache-shards.json`, the index of a sharded latent cache."""

    model_config = ConfigDict(extra="allow")

    format: Literal["fwmodel-latent-cache-shards"] = SHARD_CACHE_FORMAT
    version: Literal[1] = CACHE_VERSION
    tool_version: str = ""
    dataset: str = Field(description="the data shards as given to `fwmodel cache`")
    dataset_fingerprint: str = Field(description="their shards.json dataset_fingerprint when cached")
    spec: dict
    storage_dtype: str
    encoder_dtype: str
    vae: dict
    text_encoder: dict
    shards: list[ShardInfo] = Field(default_factory=list)
    samples: dict[str, ShardCacheEntry] = Field(default_factory=dict)


class ShardedLatentCache(LatentCache):
    """A finished sharded cache for one clip spec (see above). Its entries are read from its shards by the
    shard stream (`reader`, `sample`); `load(id)` alone cannot serve them."""

    def __init__(self, directory):
        from fwmodel.shard_data import join_location, open_location, location

        self.dir = Path(directory)
        self.location = location(directory)
        self.index_path = join_location(self.location, SHARD_CACHE_INDEX)
        try:
            with open_location(self.location, SHARD_CACHE_INDEX) as f:
                raw = json.loads(f.read())
        except (OSError, ValueError) as err:
            raise CacheError(f"sharded latent cache index {self.index_path} is unreadable ({str(err)[:200]}); run "
                             "`fwmodel cache SHARDS` again") from None
        if not isinstance(raw, dict) or raw.get("format") != SHARD_CACHE_FORMAT:
            raise CacheError(f"{self.index_path} is not a sharded fwmodel latent cache index")
        try:
            self.index = ShardCacheIndex.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            raise CacheError(f"{self.index_path}: {'.'.join(map(str, first['loc']))}: {first['msg']}; run `fwmodel "
                             "cache SHARDS` again") from None
        self.info = self.index.model_dump(mode="json")
        self.samples = self.info["samples"]
        self.shard_info = {s.name: s for s in self.index.shards}
        self.by_shard: dict[str, dict[str, dict]] = {}  # shard name -> {sample id: entry}, key order
        for sample_id, entry in sorted(self.samples.items(), key=lambda ie: ie[1]["key"]):
            self.by_shard.setdefault(entry["shard"], {})[sample_id] = entry

    def _command(self) -> str:
        return (f"fwmodel cache {getattr(self, 'data_location', self.index.dataset)} --vae PATH --text-encoder PATH"
                + (" --image-encoder PATH" if self.info.get("image_encoder") else ""))

    def check_covers(self, records: Sequence[SampleRecord], text_dim: Optional[int], shards=None,
                     global_index: Optional[Sequence[int]] = None) -> None:
        """The folder cache's checks (every record cached, none stale, the text width), then, against the
        data `shards` (a fwmodel.shard_data.ShardSet; `global_index[i]` is records[i]'s manifest index):
        each sample under its data shard's name and key, and every cache shard holding one listed,
        present with its size, and holding exactly the keys the index says (its tar headers are walked,
        no member is read). Without `shards` (a dataset folder) the cache is refused."""
        if shards is None:
            raise CacheError(
                f"the latent cache {self.dir} is sharded: it serves training on the shards it was made from "
                f"(`--data {self.index.dataset}`), not a dataset folder; make a folder cache with `fwmodel cache "
                "DATASET ...`, or point data.cache_dir elsewhere")
        self.data_location = shards.location  # what the messages tell to cache again
        super().check_covers(records, text_dim)
        needed: set[str] = set()
        for record, g in zip(records, global_index):
            entry = self.samples[record.id]
            shard = shards.index.shards[shards.shard_of[g]].name
            if (entry["shard"], entry["key"]) != (shard, f"{g:08d}"):
                raise CacheError(
                    f"latent cache {self.dir} was made for other shards: sample {record.id} is {shard}/{g:08d} in "
                    f"{shards.location}, {entry['shard']}/{entry['key']} in the cache; run `{self._command()}` again")
            needed.add(shard)
        data_shards = {s.name: s for s in shards.index.shards}
        for name in sorted(needed):
            self._check_shard(name, data_shards[name])

    def _check_shard(self, name: str, data_shard: ShardInfo) -> None:
        from fwmodel.shard_data import location_exists, is_url, join_location

        where = join_location(self.location, name)
        info = self.shard_info.get(name)
        if info is None:
            raise CacheError(f"{self.index_path} lists no shard {name} for its samples in it; run `{self._command()}` "
                             "again")
        if is_url(self.location):
            present = location_exists(self.location, name)
        else:
            path = Path(self.location) / name
            present = path.is_file()
            if present and path.stat().st_size != info.bytes:
                raise CacheError(f"cache shard {where} is damaged: {path.stat().st_size} bytes, {SHARD_CACHE_INDEX} "
                                 f"says {info.bytes} (truncated?); run `{self._command()}` again")
        if not present:
            raise CacheError(f"cache shard {where} is missing ({SHARD_CACHE_INDEX} lists it): copy the whole cache "
                             f"folder, or run `{self._command()}` again")
        keys = [index for index, _ in self.reader(data_shard, lambda i, m: False)]
        expected = [int(e["key"]) for e in self.by_shard.get(name, {}).values()]
        if keys != expected or len(keys) != info.num_samples:
            raise CacheError(f"cache shard {where} holds {len(keys)} samples, {SHARD_CACHE_INDEX} lists "
                             f"{len(expected)} (a damaged tar header ends it early?); run `{self._command()}` again")

    def reader(self, data_shard: ShardInfo, want: Callable[[int, str], bool]):
        """(global index, {member: bytes}) of the cache shard matching `data_shard`, in key order (see
        fwmodel.shard_data.iter_shard); CacheError when it cannot be read."""
        from fwmodel.shard_data import join_location, iter_shard

        try:
            yield from iter_shard(self.location, data_shard, want)
        except CacheError:
            raise
        except DataError:  # iter_shard's: a tar that cannot be read, or a key outside the data shard's range
            raise CacheError(f"cache shard {join_location(self.location, data_shard.name)} is damaged (not a readable tar of "
                             f"that shard's keys); run `{self._command()}` again") from None

    def has_i2v(self, sample_id: str) -> bool:
        return I2V_MEMBER in self.samples[sample_id]["sha256"]

    def sample(self, sample_id: str, members: dict[str, bytes], where: str) -> "CachedSample":
        """The cache entry of `sample_id` with its members as read from its cache shard (`where` names it)."""
        return CachedSample(self, sample_id, members, where)

    def load(self, sample_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise CacheError(f"the latent cache {self.dir} is sharded: its entries are streamed with the shards "
                         f"(`--data {self.index.dataset}`)")


class CachedSample:
    """One sample's entry of a sharded cache, with its member bytes: the `window_start` / `load` that
    fwmodel.data.make_sample asks a cache for. `load` checks each member's sha256 against the index."""

    def __init__(self, cache: ShardedLatentCache, sample_id: str, members: dict[str, bytes], where: str):
        self.cache, self.entry, self.members, self.where = cache, cache.samples[sample_id], members, where

    def window_start(self, sample_id: str) -> int:
        return int(self.entry["window_start"])

    def load(self, sample_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._members(((LATENTS_MEMBER, "latents"), (TEXT_MEMBER, "text")))
        return out[0], out[1]

    @property
    def i2v(self) -> bool:
        return self.cache.i2v

    def load_i2v(self, sample_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition [20, S, Hl, Wl], image_embeds [N, image_dim]), as LatentCache.load_i2v."""
        from fwmodel.i2v import with_mask

        latent, image = self._members(((I2V_MEMBER, "condition_latents"), (I2V_MEMBER, "image_embeds")))
        return with_mask(latent), image

    def _members(self, wanted) -> list[torch.Tensor]:
        """The tensors (member, tensor name) of this entry, fp32, each member's sha256 checked."""
        from safetensors.torch import load as load_bytes

        out = []
        for member, name in wanted:
            data = self.members.get(member)
            if data is None or hashlib.sha256(data).hexdigest() != self.entry["sha256"].get(member):
                what = "is missing" if data is None else f"does not match its sha256 in {SHARD_CACHE_INDEX}"
                raise CacheError(f"cache shard {self.where}.{member} {what}: the cache shard is damaged; run "
                                 f"`{self.cache._command()}` again")
            try:
                out.append(load_bytes(data)[name].float())
            except Exception as err:  # safetensors raises its own error types
                raise CacheError(f"cache shard {self.where}.{member} is unreadable ({str(err)[:200]}); run "
                                 f"`{self.cache._command()}` again") from None
        return out


@dataclass
class _PlannedSample:
    record: SampleRecord
    index: int  # global (manifest) index
    entry: dict  # ShardCacheEntry fields known before encoding (no latent_shape, sha256)
    prompt: Optional[str]  # None: not selected this run (kept only when its previous bytes can be reused)
    reuse: Optional[dict] = None  # the previous run's full entry, when its bytes are reused


_PLAN_KEYS = ("key", "shard", "window_start", "frames", "record", "prompt")


def build_shard_cache(opts: CacheOptions, progress: Optional[Callable[[str, int, int], None]] = None) -> Path:
    """The latent cache of the WebDataset shards `opts.dataset`, as tar shards matching them (see above);
    returns the cache folder (local). Incremental: a cache shard is kept untouched when its file still has
    the size and sha256 its index records and it would hold the same entries (key, record fingerprint,
    window, prompt); otherwise it is rewritten atomically (`fwdata.shards.writer.write_tar`) from the
    previous run's bytes of unchanged samples and new encodings of the others. Entries of samples not
    selected this run are kept while their data sample is unchanged (as the folder cache keeps them). The
    index is rewritten after each shard, listing only shards as they are on disk, so a killed run loses at
    most the shard in progress. The same shards and options give the same bytes."""
    from fwdata.dataset.store import DatasetBusy, atomic_write_text, check_writable_folder, clean_stale_temp_files, \
        file_sha256, write_lock
    from fwdata.shards.format import is_shard_name
    from fwdata.shards.writer import write_tar
    from fwmodel.data import MemorySource
    from fwmodel.shard_data import ShardSet, is_url, iter_shard, location

    data, spec = _cache_spec(opts)
    shards = ShardSet(data.root)
    selection = shards.select(data)
    captions = _read_captions(opts.captions)
    directory = cache_path(data.root, spec, data.cache_dir)
    if is_url(location(directory)):
        raise CacheError(f"a sharded cache is written to a local folder, not {location(directory)}: pass --cache-dir "
                         "DIR (data.cache_dir), then copy DIR beside the shards")
    if (directory / "cache.json").is_file():
        raise CacheError(f"{directory} holds a folder latent cache (cache.json); pass another --cache-dir for the "
                         "sharded one")
    prev: Optional[ShardedLatentCache] = None
    if (directory / SHARD_CACHE_INDEX).is_file():
        try:
            prev = ShardedLatentCache(directory)
        except CacheError:
            prev = None  # unreadable: every shard is written afresh
    storage = _DTYPES[opts.storage_dtype]
    vae, text_encoder = _encoders(opts)
    _check_same_encoders(prev.info if prev else {}, directory, vae, text_encoder)
    image_encoder = _image_encoder(opts)
    _check_same_image_encoder(prev.info if prev else {}, directory, image_encoder)

    # the plan: per data shard, its cached samples in key order
    selected = {r.id for r in selection.records}
    plan: dict[str, list[_PlannedSample]] = {}
    for g, record in enumerate(shards.records):
        shard = shards.index.shards[shards.shard_of[g]].name
        entry = {"key": f"{g:08d}", "shard": shard, "record": record_fingerprint(record)}
        old = prev.samples.get(record.id) if prev is not None else None
        if record.id in selected:
            start = window_start(record.num_frames, spec)
            prompt = captions.get(record.id, data.prompt)
            entry.update(window_start=start, frames=list(range(start, start + spec.span, spec.frame_stride)),
                         prompt=prompt_key(prompt))
        elif old is not None and all(old[k] == entry[k] for k in entry):
            prompt, entry = None, {k: old[k] for k in _PLAN_KEYS}  # cached by an earlier run, still valid
        else:
            continue
        plan.setdefault(shard, []).append(_PlannedSample(record, g, entry, prompt))
    valid_prev = set()  # previous shards whose files still match the index (their bytes can be reused)
    if prev is not None:
        for info in prev.index.shards:
            path = directory / info.name
            if path.is_file() and path.stat().st_size == info.bytes and file_sha256(path) == info.sha256:
                valid_prev.add(info.name)
        for items in plan.values():
            for item in items:
                old = prev.samples.get(item.record.id)
                if old is not None and old["shard"] in valid_prev and all(old[k] == item.entry[k] for k in _PLAN_KEYS) \
                        and (image_encoder is None or I2V_MEMBER in old["sha256"]):
                    item.reuse = old
    plan = {name: kept for name, items in plan.items()
            if (kept := [item for item in items if item.prompt is not None or item.reuse is not None])}
    todo = sum(item.reuse is None for items in plan.values() for item in items)

    try:
        check_writable_folder(directory)
    except OSError as err:
        raise CacheError(f"cache folder: {err}") from None
    done_shards: dict[str, ShardInfo] = {}
    done_entries: dict[str, dict] = {}
    text_memo: dict[str, bytes] = {}  # prompt key -> text member (the last few prompts)

    def write_index(final: bool) -> None:
        """The index of what is on disk: the shards finished this run, and (until the end) the previous
        run's still-valid shards not yet reached whose samples no finished shard holds."""
        listed = dict(done_shards)
        entries = dict(done_entries)
        if not final and prev is not None:
            for info in prev.index.shards:
                mine = prev.by_shard.get(info.name, {})
                if info.name in listed or info.name not in valid_prev or any(i in entries for i in mine):
                    continue
                listed[info.name] = info
                entries.update(mine)
        names = sorted(listed)
        by_shard: dict[str, list[tuple[str, dict]]] = {}
        for sample_id, entry in entries.items():
            by_shard.setdefault(entry["shard"], []).append((sample_id, entry))
        index = ShardCacheIndex(
            tool_version=__version__, dataset=str(opts.dataset), dataset_fingerprint=shards.index.dataset_fingerprint,
            spec={"num_frames": spec.num_frames, "height": spec.height, "width": spec.width,
                  "frame_stride": spec.frame_stride, "window": spec.window},
            storage_dtype=opts.storage_dtype, encoder_dtype=opts.encoder_dtype, vae=vae.provenance(),
            text_encoder=text_encoder.provenance(), shards=[listed[n] for n in names],
            **({"image_encoder": image_encoder.provenance()} if image_encoder is not None else {}),
            samples={i: e for n in names for i, e in sorted(by_shard.get(n, []), key=lambda ie: ie[1]["key"])})
        atomic_write_text(directory / SHARD_CACHE_INDEX, json.dumps(index.model_dump(mode="json"), indent=1,
                                                                    default=str) + "\n")

    def text_member(prompt: str) -> bytes:
        key = prompt_key(prompt)
        if key not in text_memo:
            if len(text_memo) >= 8:
                text_memo.pop(next(iter(text_memo)))
            text_memo[key] = save({"text": text_encoder([prompt])[0].to(storage).contiguous().cpu()},
                                  metadata={"prompt": prompt[:2000]})
        return text_memo[key]

    encoded = 0
    try:
        with write_lock(directory):
            clean_stale_temp_files(directory)
            if progress:
                progress("", 0, todo)
            data_shards = {s.name: s for s in shards.index.shards}
            for name, items in sorted(plan.items()):
                info = prev.shard_info.get(name) if prev is not None else None
                old_entries = list(prev.by_shard.get(name, {}).values()) if prev is not None else []
                if (info is not None and name in valid_prev and all(item.reuse is not None for item in items)
                        and [item.reuse for item in items] == old_entries):
                    done_shards[name] = info  # unchanged: kept as it is
                    done_entries.update({item.record.id: item.reuse for item in items})
                    write_index(final=False)
                    continue
                reuse = {item.index for item in items if item.reuse is not None}
                encode = {item.index for item in items if item.reuse is None}
                old_reader = prev.reader(data_shards[name], lambda i, m: i in reuse) if reuse else (x for x in ())
                data_reader = iter_shard(shards.location, data_shards[name], lambda i, m: m == "mp4" and i in encode)
                entries: dict[str, dict] = {}

                def samples():
                    nonlocal encoded
                    for item in items:
                        rid = item.record.id
                        if item.reuse is not None:
                            members = advance_to(old_reader, item.index, f"{directory / name}")
                            if any(hashlib.sha256(members.get(m, b"")).hexdigest() != item.reuse["sha256"].get(m)
                                   for m in item.reuse["sha256"]):
                                raise CacheError(f"{directory / name}: sample {item.entry['key']} changed while it "
                                                 "was read; run `fwmodel cache` again")
                            entries[rid] = item.reuse
                        else:
                            raw = advance_to(data_reader, item.index, f"{shards.location}/{name}")
                            source = MemorySource(raw, f"{shards.location}/{name}/{item.entry['key']}")
                            _, _, latents, i2v = _encode_sample(item.record, source, spec, vae, image_encoder)
                            members = {LATENTS_MEMBER: save({"latents": latents.to(storage).contiguous().cpu()}),
                                       TEXT_MEMBER: text_member(item.prompt)}
                            if i2v is not None:  # the bytes of the folder cache's i2v/<id> file
                                members[I2V_MEMBER] = save({k: v.to(storage).contiguous().cpu()
                                                            for k, v in i2v.items()})
                            entries[rid] = {**item.entry, "latent_shape": list(latents.shape),
                                            "sha256": {m: hashlib.sha256(b).hexdigest() for m, b in members.items()}}
                        yield {"__key__": item.entry["key"], **members}
                        if item.reuse is None:
                            encoded += 1
                            if progress:
                                progress(rid, encoded, todo)

                try:
                    size, sha256 = write_tar(directory / name, samples())
                finally:
                    old_reader.close()
                    data_reader.close()
                done_shards[name] = ShardInfo(name=name, num_samples=len(items), bytes=size, sha256=sha256,
                                              first_index=items[0].index)
                done_entries.update(entries)
                write_index(final=False)
            write_index(final=True)
            for p in sorted(directory.iterdir()):
                if is_shard_name(p.name) and p.name not in done_shards and p.is_file() and not p.is_symlink():
                    p.unlink()
    except DatasetBusy as err:
        raise CacheError(str(err)) from None
    return directory


def advance_to(reader, index: int, where: str) -> dict[str, bytes]:
    """The members of sample `index` from a forward-only (global index, members) shard reader (key order;
    the samples before it are passed over); CacheError naming `where` when the shard does not hold it."""
    for got, members in reader:
        if got == index:
            return members
        if got > index:
            break
    raise CacheError(f"{where}: sample {index:08d} is not in the shard; run `fwmodel cache` again")
