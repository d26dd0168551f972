"""Image-to-video conditioning of the Wan2.1 I2V models: the first-frame condition and the CLIP image tokens.

The one implementation of both, used by `fwmodel cache`, the trainer (encoding on the fly) and generation.
It follows diffusers' `WanImageToVideoPipeline` (`prepare_latents`, `encode_image`), with its components:

    first frame [B, 3, H, W] in [-1, 1]
      -> video [first frame, T-1 black frames] -> Wan VAE (posterior mode, normalised)   [B, 16, S, H/8, W/8]
      mask: 1 on the 4 frame slots of latent frame 0, 0 elsewhere                       [B,  4, S, H/8, W/8]
      condition = concat(mask, first-frame latent)                                      [B, 20, S, H/8, W/8]
    first frame -> CLIPImageProcessor (resize, centre crop, CLIP mean/std) -> CLIPVisionModel,
      the penultimate hidden states                                                     [B, N, image_dim]

(S = (T-1)/4 + 1 latent frames; N = 257 tokens of width 1280 for the released CLIP ViT-H/14.) The model
concatenates the condition to the noisy latents (36 input channels) and puts the image tokens before
the text tokens of every cross-attention.

`ImageEncoder("random-tiny")` builds a tiny random CLIP vision tower from a config (tests and demos: its
tokens mean nothing), like the `random-tiny` VAE and UMT5 of fwmodel.cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from fwmodel.config import VAE_TEMPORAL

#: Wan I2V condition channels: 4 mask + 16 first-frame latent channels
CONDITION_CHANNELS = 4 + 16
RANDOM_TINY = "random-tiny"
RANDOM_TINY_SEED = 0
#: the random-tiny CLIP: 28 x 28 crops of 14 x 14 patches -> 4 + 1 tokens of width `image_dim`
TINY_IMAGE_SIZE, TINY_PATCH = 28, 14


class ImageEncoderError(RuntimeError):
    """The CLIP image encoder is missing or unreadable; the message says what to do (one line)."""


def condition_mask(num_frames: int, latent_height: int, latent_width: int, batch: int = 1) -> torch.Tensor:
    """The first-frame mask [batch, 4, S, Hl, Wl] (fp32) of `WanImageToVideoPipeline.prepare_latents`:
    the video-frame mask (1 for frame 0, 0 after) with frame 0 repeated 4 times, folded 4 frames per
    latent frame; channel j of latent frame s is video frame slot 4s + j. So latent frame 0 is all ones
    and every later latent frame all zeros."""
    if (num_frames - 1) % VAE_TEMPORAL:
        raise ValueError(f"num_frames {num_frames} must be 4k+1")
    mask = torch.zeros(batch, 1, num_frames, latent_height, latent_width)
    mask[:, :, 0] = 1
    mask = torch.cat([mask[:, :, :1].repeat_interleave(VAE_TEMPORAL, dim=2), mask[:, :, 1:]], dim=2)
    return mask.view(batch, -1, VAE_TEMPORAL, latent_height, latent_width).transpose(1, 2).contiguous()


@torch.no_grad()
def first_frame_condition(vae, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The I2V condition [B, 20, S, H/8, W/8] (fp32) of first frames [B, 3, H, W] in [-1, 1].

    `vae` is a `fwmodel.cache.VideoEncoder` (posterior mode, normalised with latents_mean / latents_std:
    the same convention as the cached latents and diffusers' pipeline)."""
    return with_mask(first_frame_latent(vae, first_frame, num_frames))


@torch.no_grad()
def first_frame_latent(vae, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The 16-channel part of the condition [B, 16, S, H/8, W/8] (fp32): the VAE latent of the video
    [first frame, num_frames - 1 black frames] (what `fwmodel cache --image-encoder` stores)."""
    B, _, H, W = first_frame.shape
    video = torch.cat([first_frame[:, :, None], first_frame.new_zeros(B, 3, num_frames - 1, H, W)], dim=2)
    return vae(video)


def with_mask(latent: torch.Tensor) -> torch.Tensor:
    """condition [B, 20, S, Hl, Wl] = concat(`condition_mask`, first-frame latent [B, 16, S, Hl, Wl]); also
    for one sample ([16, S, Hl, Wl] -> [20, S, Hl, Wl]). The mask is rebuilt from the shape (T = 4(S-1)+1)."""
    single = latent.dim() == 4
    latent = latent[None] if single else latent
    B, _, S, Hl, Wl = latent.shape
    mask = condition_mask(VAE_TEMPORAL * (S - 1) + 1, Hl, Wl, B).to(device=latent.device, dtype=latent.dtype)
    out = torch.cat([mask, latent], dim=1)
    return out[0] if single else out


def clip_processor_class():
    """transformers' CLIP image processor: the PIL implementation where transformers has one (5.x; its default
    class needs torchvision, which this project does not install, and warns on every build), else the classic
    class (4.x, PIL-based already). Both resize, centre-crop and normalise alike."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def _tiny_clip(image_dim: int):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPImageProcessor = clip_processor_class()

    config = CLIPVisionConfig(hidden_size=image_dim, intermediate_size=2 * image_dim, num_hidden_layers=2,
                              num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH)
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                   crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return processor, CLIPVisionModel(config)


def random_tiny_image_encoder(image_dim: int, seed: int = RANDOM_TINY_SEED):
    """(processor, CLIPVisionModel): a tiny random CLIP vision tower of width `image_dim`, seeded, built
    without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        processor, model = _tiny_clip(image_dim)
    return processor, model.eval()


def write_tiny_image_encoder(directory: Path, image_dim: int, seed: int = RANDOM_TINY_SEED) -> Path:
    """Save the random-tiny CLIP in the Wan I2V repository layout (image_encoder/, image_processor/) under
    `directory`, beside fwmodel.cache.write_tiny_encoders' vae/ and text_encoder/, with the random marker
    in image_encoder/ (so a cache made with it is marked random_init). Returns `directory`."""
    import json

    from fwmodel.cache import RANDOM_MARKER

    directory = Path(directory)
    processor, model = random_tiny_image_encoder(image_dim, seed)
    model.save_pretrained(directory / "image_encoder")
    processor.save_pretrained(directory / "image_processor")
    (directory / "image_encoder" / RANDOM_MARKER).write_text(
        json.dumps({"random_init": True, "image_dim": image_dim, "seed": seed}))
    return directory


def _component(path: Path, subfolder: str) -> Path:
    path = Path(path).expanduser()
    if (path / subfolder / "config.json").is_file() or (path / subfolder / "preprocessor_config.json").is_file():
        return path / subfolder
    return path


def _written_random(directory: Optional[Path]) -> bool:
    """True for a CLIP written by `write_tiny_image_encoder` (or beside fwmodel.cache.write_tiny_encoders')."""
    from fwmodel.cache import RANDOM_MARKER

    return directory is not None and any((d / RANDOM_MARKER).is_file() for d in (directory, directory.parent))


class ImageEncoder:
    """CLIP vision tower of a Wan I2V repository: first frames [B, 3, H, W] in [-1, 1] -> image tokens
    [B, N, image_dim] (fp32), the penultimate hidden states, as `WanImageToVideoPipeline.encode_image`.

    `path`: a Wan I2V repository root (image_encoder/ and image_processor/ inside) or the image_encoder
    folder itself (the processor is looked for beside it), or `random-tiny` (`image_dim` wide)."""

    def __init__(self, path, device: torch.device, dtype: torch.dtype = torch.float32, image_dim: int = 16):
        from transformers import CLIPVisionModel

        CLIPImageProcessor = clip_processor_class()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.random_tiny = str(path) == RANDOM_TINY
        if self.random_tiny:
            self.dir = self.processor_dir = None
            self.processor, self.model = random_tiny_image_encoder(image_dim)
        else:
            self.dir = _component(path, "image_encoder")
            self.processor_dir = next((d for d in (self.dir.parent / "image_processor", self.dir)
                                       if (d / "preprocessor_config.json").is_file()), None)
            if not (self.dir / "config.json").is_file() or self.processor_dir is None:
                raise ImageEncoderError(
                    f"CLIP image encoder not found at {path}: expected a diffusers-format Wan I2V repository "
                    "(image_encoder/ and image_processor/), e.g. `hf download Wan-AI/Wan2.1-I2V-14B-480P-Diffusers "
                    f"--local-dir {path}`, or `{RANDOM_TINY}` for a tiny random one (tests and demos)")
            try:
                self.processor = CLIPImageProcessor.from_pretrained(self.processor_dir, local_files_only=True)
                self.model = CLIPVisionModel.from_pretrained(self.dir, dtype=dtype, local_files_only=True)
            except (OSError, ValueError) as err:
                raise ImageEncoderError(f"could not load the CLIP image encoder from {self.dir} ({err})") from err
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_tokens(self) -> int:
        cfg = self.model.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1

    @torch.no_grad()
    def __call__(self, first_frame: torch.Tensor) -> torch.Tensor:
        images = ((first_frame.float().clamp(-1, 1) + 1) / 2).cpu()  # [0, 1]: the processor's rescale is off
        pixels = self.processor(images=list(images), do_rescale=False, return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float()

    def provenance(self) -> dict:
        cfg = self.model.config
        info = {"path": str(self.dir) if self.dir else RANDOM_TINY, "processor": str(self.processor_dir),
                "class": type(self.model).__name__, "hidden_size": self.dim, "tokens": self.num_tokens,
                "layer": "penultimate hidden states", "image_size": cfg.image_size,
                "random_init": self.random_tiny or _written_random(self.dir)}
        if self.random_tiny:
            info.update(seed=RANDOM_TINY_SEED, built="in memory from a config, randomly initialised (no download): "
                        "its output means nothing")
        return info


#: tokens of the released Wan I2V CLIP (ViT-H/14 at 224 x 224: 16 x 16 patches + the class token), width 1280
RELEASED_IMAGE_TOKENS, RELEASED_IMAGE_DIM = 257, 1280


def num_image_tokens(image_dim: int) -> int:
    """Image tokens N of the CLIP a preset of this `image_dim` is trained with: 257 for the released
    1280-wide ViT-H/14, else the random-tiny CLIP's (TINY_IMAGE_SIZE / TINY_PATCH)^2 + 1 = 5."""
    return RELEASED_IMAGE_TOKENS if image_dim == RELEASED_IMAGE_DIM else (TINY_IMAGE_SIZE // TINY_PATCH) ** 2 + 1


def load_image_encoder(path, device: torch.device, dtype: torch.dtype, model_config) -> ImageEncoder:
    """The `ImageEncoder` at `path` for an I2V preset, checked to give tokens of the preset's image_dim
    (ImageEncoderError, one line, otherwise). The one check the trainer, eval and generation make."""
    want = model_config.wan.image_dim
    encoder = ImageEncoder(path, device, dtype, image_dim=want)
    if encoder.dim != want:
        raise ImageEncoderError(f"image encoder {path} gives image tokens of width {encoder.dim}, but preset "
                                f"{model_config.name} expects {want} (the Wan2.1 I2V models use CLIP ViT-H/14, 1280)")
    return encoder


def is_i2v(model_config) -> bool:
    """True for an image-to-video preset (36 input channels and CLIP image tokens)."""
    return model_config.wan.in_channels == 16 + CONDITION_CHANNELS and model_config.wan.image_dim is not None


def image_dim(model_config) -> Optional[int]:
    return model_config.wan.image_dim
