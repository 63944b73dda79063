"""ReNO's reward models (arXiv 2406.04312): each loss equals the official formula computed
through another path of the same tiny model; local loading, the registry, and clear errors."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_reno_models import tiny_clip_model
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

import genforge.rewards as rewards
from genforge.metrics.digits_classifier import load_digits_classifier
from genforge.rewards import CLIP_MEAN, CLIP_STD, AestheticReward, CLIPReward, ClassifierReward, RewardMLP

PROMPTS = ["a red cat", "two blue dogs"]
FIXTURES = Path(__file__).parents[1] / "fixtures"


def official_transform(size):
    """ReNO's ``clip_img_transform``, applied to the image tensor."""
    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), Normalize(CLIP_MEAN, CLIP_STD)])


def images(seed=0, shape=(2, 3, 48, 40)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("offset", [100.0, 30.0])  # CLIP, PickScore
def test_clip_family_loss_is_offset_minus_the_models_own_logits(clip_tokenizer, offset):
    model = tiny_clip_model()
    reward = CLIPReward(model, clip_tokenizer, offset=offset)
    x = images()
    tokens = clip_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**tokens, pixel_values=official_transform(32)(x)).logits_per_image  # scale * cos, (B, B)
    loss = reward.loss(x, PROMPTS)
    assert torch.allclose(loss, offset - logits.diagonal(), atol=1e-4)
    loss.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_aesthetic_loss_is_ten_minus_the_head_on_normalised_clip_image_features(clip_tokenizer):
    model = tiny_clip_model()
    torch.manual_seed(1)
    head = RewardMLP(16).eval()
    reward = AestheticReward(model, head)
    x = images()
    with torch.no_grad():
        out = model(**clip_tokenizer(PROMPTS, return_tensors="pt", padding=True), pixel_values=official_transform(32)(x))
        expected = 10 - head.layers(out.image_embeds).squeeze(-1)  # image_embeds: normalised projection
    assert torch.allclose(reward.loss(x, PROMPTS), expected, atol=1e-5)


def test_hpsv2_loss_is_one_minus_cosine_of_the_open_clip_model(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="HPSv2 needs the [rewards] extra (open_clip)")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "gf-tiny-hps.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "gf-tiny-hps.json")
    torch.manual_seed(0)
    model = open_clip.create_model("gf-tiny-hps", pretrained=None).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = rewards.load("hpsv2", tmp_path, model_name="gf-tiny-hps")
    x = images()
    with torch.no_grad():
        out = model(official_transform(32)(x), open_clip.get_tokenizer("ViT-H-14")(PROMPTS))
        image, text = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    assert torch.allclose(reward.loss(x, PROMPTS), 1 - (image * text).sum(-1), atol=1e-5)


def test_hpsv2_without_open_clip_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as when the [rewards] extra is absent
    torch.save({"state_dict": {}}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(ImportError, match=r"pip install 'genforge\[rewards\]'"):
        rewards.load("hpsv2", tmp_path)


def test_saved_clip_and_pickscore_directories_load_to_the_same_reward(tmp_path, clip_tokenizer_dir, clip_tokenizer):
    model = tiny_clip_model()
    model.save_pretrained(tmp_path / "clip")
    clip_tokenizer.save_pretrained(tmp_path / "clip")
    model.save_pretrained(tmp_path / "pickscore")  # PickScore's repository has no tokenizer: given apart
    x = images()
    expected = CLIPReward(model, clip_tokenizer, 100.0).loss(x, PROMPTS)
    assert torch.allclose(rewards.load("clip", tmp_path / "clip").loss(x, PROMPTS), expected, atol=1e-6)
    pick = rewards.load("pickscore", tmp_path / "pickscore", tokenizer=clip_tokenizer_dir)
    assert torch.allclose(pick.loss(x, PROMPTS), expected - 70.0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        rewards.load("pickscore", tmp_path / "pickscore")


def test_classifier_reward_is_the_log_probability_of_the_wanted_class():
    classifier = load_digits_classifier()
    reward = rewards.load("digits-cnn")
    x, labels = images(shape=(4, 3, 8, 8)), torch.tensor([0, 3, 7, 9])
    expected = F.cross_entropy(classifier(x.detach() * 2 - 1), labels, reduction="none")
    assert torch.allclose(reward.loss(x, labels), expected, atol=1e-5)
    one_label = F.cross_entropy(classifier(x.detach() * 2 - 1), torch.full((4,), 3), reduction="none")
    assert torch.allclose(reward.score(x, 3), -one_label, atol=1e-5)
    with pytest.raises(ValueError, match=r"labels in \[0, 10\)"):
        reward.loss(x, [0, 1, 2, 10])


def test_the_registry_refuses_a_taken_name_and_names_the_known_ones():
    with pytest.raises(ValueError, match="'clip' is already registered"):
        rewards.register_reward("clip", lambda path: ClassifierReward(load_digits_classifier()))
    with pytest.raises(KeyError, match="registered: .*'hpsv2'.*'imagereward'"):
        rewards.load("hps")


@pytest.mark.parametrize("name, missing", [("clip", "config.json"), ("pickscore", "config.json"),
                                           ("hpsv2", "HPS_v2.1_compressed.pt"), ("imagereward", "ImageReward.pt"),
                                           ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
                                           ("digits-cnn", "nothing.safetensors")])
def test_a_missing_weight_file_is_named_before_anything_is_built(tmp_path, name, missing):
    path = tmp_path / "nothing.safetensors" if name == "digits-cnn" else tmp_path
    with pytest.raises(FileNotFoundError, match=missing.replace("+", r"\+")):
        rewards.load(name, path)


def test_imagereward_loads_the_official_layout_and_matches_the_official_loss(tmp_path):
    """tests/fixtures/imagereward_official_tiny.json: the official checkpoint's key names and
    shapes for a tiny BLIP, and the loss ReNO's official code computed on them (in scratch)."""
    fixture = json.loads((FIXTURES / "imagereward_official_tiny.json").read_text())
    torch.manual_seed(0)
    state = {k: (torch.arange(s[-1]).expand(*s).clone() if k.endswith("position_ids") else torch.randn(s) * 0.1)
             for k, s in fixture["official_keys"].items()}
    torch.save(state, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(fixture["med_config"]))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text("\n".join(fixture["vocab"]) + "\n")
    reward = rewards.load("imagereward", tmp_path, vision_config=fixture["vision_config"])
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(reward.loss(x, fixture["prompts"]), torch.tensor(fixture["official_loss"]), atol=1e-5)
    del state["mlp.layers.7.bias"]
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"ImageReward mlp in .*missing \(1\): \['layers.7.bias'\]"):
        rewards.load("imagereward", tmp_path, vision_config=fixture["vision_config"])
