"""Token-based class-conditional generation as training-loop methods: the VQ tokenizer, ENAT,
its MaskGIT baseline and the aMUSEd peer.

- ``vq_tokenizer``: a diffusers ``VQModel`` trained on images with reconstruction MSE plus
  its codebook/commitment loss (VQ-VAE, van den Oord et al. 2017, arXiv 1711.00937, Eq. 3),
  or, with ``model.tokenizer: {path: DIR}`` and ``train.max_steps: 0``, a saved tokenizer used
  as it is (the official MaskGIT VQGAN converted by
  :func:`~genforge.models.maskgit_vqgan.load_official_vqgan` and saved with ``save_pretrained``);
  at the end the tokenizer is saved to ``<output_dir>/tokenizer``, every training image is
  encoded once into token shards under ``<output_dir>/tokens``
  (:func:`genforge.data.tokens.write_token_shards`, resumable; every process of an
  ``accelerate launch`` writes its share of the shards; ``model.flip: true`` also caches each
  image's horizontal flip, as the official ImageNet extraction does) and the reconstruction MSE
  of the first ``eval.num_samples`` images of the train split (and of the test split, where the
  dataset has one; image folders have none) is scored. Tokenizers are used through
  :mod:`genforge.models.tokenizers`.
- ``enat``: :class:`~genforge.models.enat.ENATModel` with ENAT's training step
  (:func:`~genforge.models.enat.enat_training_loss`: one Beta(12, 3) ratio per batch, the
  simulated previous step through the loop's EMA model with probability ``reuse_prob`` = 0.5).
- ``maskgit``: :class:`~genforge.models.maskgit.MaskGITModel`, the same per-batch masking and loss.
- ``amused``: :class:`~genforge.models.amused_class.AmusedClassModel` (diffusers ``UVit2DModel``),
  trained as aMUSEd trains: a mask ratio cos(pi/2 u), u ~ U(0, 1), per sample; same loss.

Labels: ``label_drop`` (0.15, the official dataset's ``p_uncond``) replaces labels by the null
class in the data, and the model's own ``class_dropout`` (0.1, the official ``LabelEmbedder``)
drops again in training mode: both mechanisms are active, as in the official code. The token
recipes name the tokenizer run in ``model.tokenizer`` and sample with ``model.sampling``
(extra pipeline arguments: temperatures, guidance ramp, schedule).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AmusedScheduler, VQModel
from torch.utils.data import DataLoader, Subset

from genforge.config import ConfigError, check_known_keys
from genforge.core.embed import drop_labels
from genforge.core.io import write_json
from genforge.data import build_dataset
from genforge.data.grid import save_class_grid
from genforge.data.tokens import TokenShards, shard_sequence_length, write_token_shards
from genforge.methods.sampling import check_eval_inputs, evaluate_pipeline
from genforge.models.amused_class import AmusedClassModel
from genforge.models.enat import ENATModel, enat_training_loss
from genforge.models.maskgit import MaskGITModel, masked_token_loss, random_masking
from genforge.models.tokenizers import as_tokenizer, load_tokenizer
from genforge.pipelines.enat import AmusedClassPipeline, ENATPipeline, MaskGITPipeline
from genforge.train import Method, register_method

VQ_CONFIGS = {
    "digits": {"in_channels": 1, "out_channels": 1, "down_block_types": ["DownEncoderBlock2D"] * 2,
               "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [32, 64], "layers_per_block": 1,
               "latent_channels": 16, "vq_embed_dim": 16, "num_vq_embeddings": 64, "norm_num_groups": 16,
               "sample_size": 8, "lookup_from_codebook": True},
}
"""Named tokenizers; ``digits``: 8x8 digits -> 4x4 grids of 64 codes (f = 2)."""

TOKEN_CONFIGS = {
    "enat": {"tiny": dict(width=64, encoder_depth=2, decoder_depth=1, num_heads=4),
             "digits": dict(width=128, encoder_depth=6, decoder_depth=2, num_heads=4),
             "L": dict(width=1024, encoder_depth=22, decoder_depth=2, num_heads=16)},
    "maskgit": {"tiny": dict(width=64, depth=3, num_heads=4),
                "digits": dict(width=128, depth=8, num_heads=4)},
    "amused": {"tiny": dict(hidden_size=64, block_out_channels=32, num_res_blocks=1, block_num_heads=2,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
               "digits": dict(hidden_size=128, block_out_channels=64, num_res_blocks=1, block_num_heads=2,
                              num_hidden_layers=7, num_attention_heads=4, intermediate_size=448)},
}
"""Named token-network configs (codebook, grid and classes come from the tokenizer run);
``digits``: ENAT 6 + 2 blocks and MaskGIT 8 blocks at width 128, aMUSEd sized to MaskGIT's
parameter count (docs/benchmarks.md lists the counts); ``L``: ENAT-L (official ``--enc_dec 22 2
--embed_dim 1024 --num_heads 16``; the only size whose settings are public)."""


def _named_args(method: Method, model_cfg: dict, named: dict, model_class: type, keys: set) -> None:
    source = f"recipe for method {method.name!r}"
    check_known_keys(model_cfg, sorted(keys), "model", source)
    if model_cfg.get("config", "digits") not in named:
        raise ConfigError(f"{source}: model.config {model_cfg.get('config')!r} is not one of {sorted(named)}")
    args = model_cfg.get("args", {})
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: model.args must be a mapping, got {type(args).__name__}")
    accepted = [p for p in inspect.signature(model_class.__init__).parameters if p != "self"]
    check_known_keys(args, accepted, "model.args", source)


@register_method("vq_tokenizer")
class VQTokenizerMethod(Method):
    """Train a ``VQModel`` tokenizer (or take a saved one), then cache every training image's tokens."""

    def _source(self) -> str:
        return f"recipe for method {self.name!r}"

    def validate_model_config(self, model_cfg: dict) -> None:
        if not isinstance(model_cfg.get("flip", False), bool):
            raise ConfigError(f"{self._source()}: model.flip must be true or false, got {model_cfg['flip']!r}")
        if "tokenizer" not in model_cfg:
            _named_args(self, model_cfg, VQ_CONFIGS, VQModel, {"config", "args", "shard_size", "flip"})
            return
        check_known_keys(model_cfg, ["tokenizer", "shard_size", "flip"], "model", self._source())
        spec = model_cfg["tokenizer"]
        if not isinstance(spec, dict) or set(spec) != {"path"}:
            raise ConfigError(f"{self._source()}: model.tokenizer must be {{path: DIR}}, DIR a saved VQModel or "
                              f"MaskGITVQGAN; got {spec!r}")
        if self.recipe.train.max_steps != 0:
            raise ConfigError(f"{self._source()}: a saved tokenizer (model.tokenizer.path) is used as it is; "
                              f"train.max_steps must be 0, got {self.recipe.train.max_steps}")

    def build_model(self):
        model_cfg = self.recipe.model
        if "tokenizer" in model_cfg:
            model = load_tokenizer(model_cfg["tokenizer"]["path"])
        else:
            model = VQModel(**{**copy.deepcopy(VQ_CONFIGS[model_cfg.get("config", "digits")]),
                               **model_cfg.get("args", {})})
        channels, expected = self.train_dataset().channels, as_tokenizer(model).in_channels
        if channels != expected:
            raise ConfigError(f"{self._source()}: data {self.recipe.data.name!r} gives {channels}-channel images but "
                              f"the tokenizer takes {expected} channels (set data.channels: {expected})")
        return model

    def _dataset(self, split: str):
        data = self.recipe.data
        return build_dataset(data.name, split=split, root=data.root, image_size=data.image_size, resize=data.resize,
                             channels=data.channels)

    @functools.cache  # noqa: B019 -- one method object per run; a folder is walked once
    def train_dataset(self):
        return self._dataset("train")

    def training_step(self, model, batch):
        images, _ = batch
        out = model(images)
        reconstruction = F.mse_loss(out.sample.float(), images.float())
        commitment = out.commit_loss.float().mean()
        return reconstruction + commitment, {"mse": reconstruction.detach(), "commit": commitment.detach()}

    @torch.no_grad()
    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        output_dir, data = Path(output_dir), self.recipe.data
        tokenizer, device = as_tokenizer(ema_model.eval()), accelerator.device
        if accelerator.is_main_process:
            ema_model.save_pretrained(output_dir / "tokenizer")
        train = self.train_dataset()
        write_token_shards(lambda x: tokenizer.encode_to_ids(x.to(device)), train, output_dir / "tokens",
                           shard_size=int(self.recipe.model.get("shard_size", 4096)), batch_size=data.batch_size,
                           num_workers=data.num_workers, rank=accelerator.process_index,
                           world=accelerator.num_processes, flip=bool(self.recipe.model.get("flip", False)))
        accelerator.wait_for_everyone()  # every shard is on disk before anyone reads them
        if not accelerator.is_main_process:
            return {}
        write_json(output_dir / "tokens" / "info.json", {"num_classes": int(train.num_classes)})
        metrics = {}
        for split in ("train",) if data.name == "image_folder" else ("train", "test"):
            metrics[f"reconstruction_mse_{split}"], pairs = self._reconstruction(tokenizer, split, device)
        save_class_grid(pairs, pairs.shape[0] // 2, output_dir / "reconstructions.png")
        metrics["codes_used"] = int(torch.unique(TokenShards(output_dir / "tokens").tokens).numel())
        write_json(output_dir / "tokenizer_metrics.json", metrics, indent=2)
        return metrics

    def _reconstruction(self, tokenizer, split: str, device) -> tuple[float, torch.Tensor]:
        """MSE of the tokenizer's reconstructions of the first ``eval.num_samples`` images of ``split``,
        and the first (up to) 10 images followed by their reconstructions."""
        dataset = self.train_dataset() if split == "train" else self._dataset(split)
        subset = Subset(dataset, range(min(len(dataset), self.recipe.eval.num_samples)))
        squared, count, shown = 0.0, 0, []
        for images, _ in DataLoader(subset, batch_size=self.recipe.eval.batch_size):
            ids = tokenizer.encode_to_ids(images.to(device))
            side = math.isqrt(ids.shape[1])
            recon = tokenizer.decode_ids(ids, (side, side)).clamp(-1, 1).float().cpu()
            squared, count = squared + float((recon - images).pow(2).sum()), count + images.numel()
            if not shown:
                shown = [images[:10], recon[:10]]
        return squared / count, torch.cat(shown)


class TokenGeneratorMethod(Method):
    """Shared setup of the token generators: model from the tokenizer's codebook and grid."""

    model_class: type
    pipeline_class: type
    extra_keys: set = set()
    sampling_keys: set = {"mask_temp", "samp_temp", "guidance_ramp", "schedule"}

    def __init__(self, recipe):
        super().__init__(recipe)
        check_eval_inputs(recipe, self._source())

    def _source(self) -> str:
        return f"recipe for method {self.name!r}"

    def validate_model_config(self, model_cfg: dict) -> None:
        _named_args(self, model_cfg, TOKEN_CONFIGS[self.name], self.model_class,
                    {"tokenizer", "config", "args", "label_drop", "sampling", *self.extra_keys})
        if "tokenizer" not in model_cfg:
            raise ConfigError(f"{self._source()}: model.tokenizer (the output_dir of a vq_tokenizer run) is required")
        drop = model_cfg.get("label_drop", 0.15)
        if not isinstance(drop, (int, float)) or not 0 <= drop < 1:
            raise ConfigError(f"{self._source()}: model.label_drop must be in [0, 1), got {drop!r}")
        check_known_keys(model_cfg.get("sampling", {}), sorted(self.sampling_keys), "model.sampling", self._source())

    def tokenizer_dir(self) -> Path:
        return Path(self.recipe.model["tokenizer"])

    @functools.cached_property
    def tokenizer(self):
        """The tokenizer run's tokenizer network (a ``VQModel`` or a ``MaskGITVQGAN``)."""
        return load_tokenizer(self.tokenizer_dir() / "tokenizer")

    def network_config(self) -> dict:
        tokens = self.tokenizer_dir() / "tokens"
        info = json.loads((tokens / "info.json").read_text())
        model_cfg = self.recipe.model
        return {**TOKEN_CONFIGS[self.name][model_cfg.get("config", "digits")],
                "codebook_size": as_tokenizer(self.tokenizer).codebook_size,
                "num_tokens": shard_sequence_length(tokens), "num_classes": info["num_classes"],
                **model_cfg.get("args", {})}

    def build_model(self):
        return self.model_class(**self.network_config())

    def train_dataset(self):
        data = TokenShards(self.tokenizer_dir() / "tokens")
        expected = self.network_config()
        if data.tokens.shape[1] != expected["num_tokens"] or int(data.tokens.max()) >= expected["codebook_size"]:
            raise ConfigError(f"{self._source()}: the token shards do not fit the tokenizer's grid and codebook")
        return data

    def loss(self, model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask_id = getattr(model, "module", model).config.codebook_size
        ids = random_masking(tokens, mask_id)
        return masked_token_loss(model(ids, labels).logits, tokens, ids == mask_id)

    def training_step(self, model, batch):
        tokens, labels = batch
        unwrapped = getattr(model, "module", model)
        labels = drop_labels(labels, self.recipe.model.get("label_drop", 0.15), unwrapped.config.num_classes)
        return self.loss(model, tokens, labels), {}

    def pipeline(self, model):
        return self.pipeline_class(model=model, vqvae=self.tokenizer.to(model.device))

    def on_train_end(self, ema_model, accelerator, output_dir: Path) -> dict:
        if not accelerator.is_main_process:
            return {}
        pipe = self.pipeline(ema_model.eval())
        return evaluate_pipeline(pipe, ema_model.config.num_classes, self.recipe, Path(output_dir),
                                 **self.recipe.model.get("sampling", {}))


@register_method("enat")
class ENATMethod(TokenGeneratorMethod):
    """ENAT (arXiv 2411.06959) with its reuse-aware training step."""

    model_class, pipeline_class = ENATModel, ENATPipeline
    extra_keys = {"reuse_prob", "ema_for_cond"}
    # a step without the simulated previous step leaves PrevProj and the context projections idle, and each
    # process draws its own (the official DDP also sets find_unused_parameters=True)
    find_unused_parameters = True

    def loss(self, model, tokens, labels):
        options = self.recipe.model
        teacher = self.ema_model if options.get("ema_for_cond", True) else None
        return enat_training_loss(model, teacher, tokens, labels, reuse_prob=float(options.get("reuse_prob", 0.5)))


@register_method("maskgit")
class MaskGITMethod(TokenGeneratorMethod):
    """The NAT baseline: every token through every block."""

    model_class, pipeline_class = MaskGITModel, MaskGITPipeline


@register_method("amused")
class AmusedMethod(TokenGeneratorMethod):
    """The aMUSEd peer: diffusers' UVit2DModel, per-sample cosine mask ratios, AmusedScheduler sampling."""

    model_class, pipeline_class = AmusedClassModel, AmusedClassPipeline
    sampling_keys = {"temperature"}

    def loss(self, model, tokens, labels):
        mask_id = getattr(model, "module", model).config.codebook_size
        ratio = torch.cos(math.pi / 2 * torch.rand(tokens.shape[0], 1, device=tokens.device))
        count = (tokens.shape[1] * ratio).round().clamp(min=1)
        masked = torch.rand(tokens.shape, device=tokens.device).argsort(dim=1) < count
        return masked_token_loss(model(torch.where(masked, mask_id, tokens), labels).logits, tokens, masked)

    def pipeline(self, model):
        scheduler = AmusedScheduler(mask_token_id=model.config.codebook_size)
        return AmusedClassPipeline(model=model, vqvae=self.tokenizer.to(model.device), scheduler=scheduler)
