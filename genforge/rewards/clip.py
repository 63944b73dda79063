"""The CLIP-family rewards of ReNO (arXiv 2406.04312): CLIP, PickScore, HPS v2.1, aesthetic.

Official forms (ExplainableML/ReNO ``rewards/``), with L2-normalised features f_img, f_txt:

- CLIP (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, transformers): L = 100 - exp(logit_scale) * cos;
- PickScore (yuvalkirstain/PickScore_v1, transformers; tokenizer of the laion ViT-H-14):
  L = 30 - exp(logit_scale) * cos;
- HPS v2.1 (open_clip ViT-H-14 with the ``state_dict`` of ``HPS_v2.1_compressed.pt``):
  L = 1 - cos. open_clip comes with the optional ``[rewards]`` extra; the ``hpsv2`` package
  is not used (its wheel lacks the tokenizer vocabulary it loads at import, and it pins pytest);
- aesthetic (LAION improved-aesthetic-predictor: an MLP on normalised OpenAI CLIP ViT-L/14
  image features): L = 10 - mlp(f_img). The official ReNO code runs ViT-L/14 through the
  ``clip`` package; here it is transformers' port of the same model (a local directory).

Text is tokenised with padding to the longest prompt, truncated to 77 tokens, as officially.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from genforge.rewards.base import CLIP_MEAN, CLIP_STD, Reward, RewardMLP, register_reward, require_files

__all__ = ["AestheticReward", "CLIPReward", "HPSv2Reward"]

TRANSFORMERS_WEIGHTS = "model.safetensors|pytorch_model.bin"
TOKENIZER_FILES = "tokenizer.json|vocab.json"
HPS_CHECKPOINT = "HPS_v2.1_compressed.pt"
AESTHETIC_HEAD = "sac+logos+ava1-l14-linearMSE.pth"


def _projected(output) -> torch.Tensor:
    """CLIPModel.get_*_features output as a tensor (transformers 5 returns the projection as
    ``pooler_output`` of a model output, earlier versions the tensor itself)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _vision_size(config) -> int:
    return int(config.vision_config.image_size)


class CLIPReward(Reward):
    """offset - exp(logit_scale) * cos(image, prompt) with a transformers ``CLIPModel``
    (CLIP: offset 100; PickScore: offset 30)."""

    def __init__(self, model, tokenizer, offset: float) -> None:
        super().__init__(_vision_size(model.config), CLIP_MEAN, CLIP_STD)
        self.model, self.tokenizer, self.offset = model, tokenizer, float(offset)
        self.freeze()

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, return_tensors="pt", padding=True, max_length=77, truncation=True)
        return F.normalize(_projected(self.model.get_text_features(**tokens.to(self.device))), dim=-1)

    def score_inputs(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        return self.model.logit_scale.exp() * (image * self.text_features(prompts)).sum(-1)


class HPSv2Reward(Reward):
    """HPS v2.1: 1 - cos(image, prompt) with an open_clip CLIP model and its tokenizer."""

    offset = 1.0

    def __init__(self, model, tokenizer) -> None:
        size = model.visual.image_size
        super().__init__(size if isinstance(size, int) else size[0],
                         getattr(model.visual, "image_mean", None) or CLIP_MEAN,
                         getattr(model.visual, "image_std", None) or CLIP_STD)
        self.model, self.tokenizer = model, tokenizer
        self.freeze()

    def score_inputs(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = F.normalize(self.model.encode_image(pixels), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)), dim=-1)
        return (image * text).sum(-1)


class AestheticReward(Reward):
    """10 - head(normalised CLIP image features); the prompt is not used."""

    offset = 10.0

    def __init__(self, model, head: RewardMLP) -> None:
        super().__init__(_vision_size(model.config), CLIP_MEAN, CLIP_STD)
        self.model, self.head = model, head
        self.freeze()

    def score_inputs(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        features = F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        return self.head(features)


def _clip_model(path: Path, what: str):
    from transformers import CLIPModel

    require_files(path, "config.json", TRANSFORMERS_WEIGHTS, what=what)
    return CLIPModel.from_pretrained(path, local_files_only=True)


def _tokenizer(path, tokenizer_path, what: str):
    from transformers import AutoTokenizer

    source = require_files(tokenizer_path if tokenizer_path is not None else path, TOKENIZER_FILES,
                           what=f"{what} tokenizer")
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def load_clip(path, tokenizer: str | Path | None = None) -> CLIPReward:
    """CLIP reward from a transformers CLIP directory (its tokenizer there or at ``tokenizer``)."""
    return CLIPReward(_clip_model(path, "CLIP"), _tokenizer(path, tokenizer, "CLIP"), offset=100.0)


def load_pickscore(path, tokenizer: str | Path | None = None) -> CLIPReward:
    """PickScore from its transformers directory; the tokenizer is the laion CLIP-ViT-H-14 one
    (in ``path`` or at ``tokenizer``), as in PickScore's own example."""
    return CLIPReward(_clip_model(path, "PickScore"), _tokenizer(path, tokenizer, "PickScore"), offset=30.0)


def load_hpsv2(path, model_name: str = "ViT-H-14") -> HPSv2Reward:
    """HPS v2.1 from ``path/HPS_v2.1_compressed.pt`` on open_clip's ``model_name`` architecture
    (built with ``pretrained=None``: nothing is downloaded)."""
    from genforge.core.state_dict import load_state_dict_strict, read_state_dict

    path = require_files(path, HPS_CHECKPOINT, what="HPSv2")
    try:
        import open_clip
    except ImportError:
        raise ImportError("the HPSv2 reward needs open_clip: pip install 'genforge[rewards]'") from None
    model = open_clip.create_model(model_name, pretrained=None)
    load_state_dict_strict(model, read_state_dict(path / HPS_CHECKPOINT), what=f"HPSv2 checkpoint {path / HPS_CHECKPOINT}")
    return HPSv2Reward(model, open_clip.get_tokenizer(model_name))


def load_aesthetic(path) -> AestheticReward:
    """The LAION aesthetic predictor: ``path/clip/`` (transformers openai/clip-vit-large-patch14)
    and the head ``path/sac+logos+ava1-l14-linearMSE.pth``."""
    from genforge.core.state_dict import load_state_dict_strict, read_state_dict

    path = require_files(path, AESTHETIC_HEAD, what="aesthetic")
    model = _clip_model(path / "clip", "aesthetic (CLIP ViT-L/14)")
    head = RewardMLP(model.config.projection_dim)
    load_state_dict_strict(head, read_state_dict(path / AESTHETIC_HEAD), what=f"aesthetic head {path / AESTHETIC_HEAD}")
    return AestheticReward(model, head)


register_reward("clip", load_clip)
register_reward("pickscore", load_pickscore)
register_reward("hpsv2", load_hpsv2)
register_reward("aesthetic", load_aesthetic)
