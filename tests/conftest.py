"""Session fixtures shared across test folders: the tiny CLIP tokenizer of the ReNO tests (builders in
tiny_reno_models.py), a random local Inception weights file for FID without a download, and a
one-process gloo group for DDP tests."""

import pytest
import torch

from tiny_reno_models import write_clip_tokenizer


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    """Directory of the tiny CLIP tokenizer (vocabulary of 514 byte tokens)."""
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def clip_tokenizer(clip_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(clip_tokenizer_dir, local_files_only=True)


def _no_download(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture(scope="session")
def inception_weights_file(tmp_path_factory):
    """A random-initialised torch-fidelity Inception state dict saved with torch.save, as torch-fidelity
    reads it: exactly the keys and shapes its loader expects, made from the module's own layers."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, "load_state_dict_from_url", _no_download)
        mp.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        skeleton = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["64"],
                                                         feature_extractor_weights_path=str(empty))
    for module in skeleton.modules():  # He init keeps activations O(1), so distances are not ~0
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "inception_random.pth"
    torch.save(skeleton.state_dict(), path)
    return str(path)


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo process group, so a test can wrap a model in DistributedDataParallel on CPU."""
    from torch import distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'gloo_store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
