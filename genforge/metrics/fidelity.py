"""FID / KID / IS through torch-fidelity, with a digits-CNN feature extractor for small domains.

The metrics are torch-fidelity's (Obukhov et al., https://github.com/toshas/torch-fidelity):
FID (Heusel et al. 2017, arXiv:1706.08500), KID (Binkowski et al. 2018, arXiv:1801.01401) and
IS (Salimans et al. 2016, arXiv:1606.03498); genforge computes no distance itself. It adds:

* ``"digits-cnn"``: a torch-fidelity feature extractor (registered on import through
  ``torch_fidelity.register_feature_extractor``) built on the shipped
  :class:`~genforge.metrics.digits_classifier.DigitsCNN`; FID/KID use its 64-d penultimate
  ``"features"``, IS its ``"logits"``. Inception features mean little on 8x8 digits.
  ``"mnist-cnn"`` does the same with :class:`~genforge.metrics.mnist_classifier.MNISTCNN` for
  MNIST-5k at 32x32. :data:`JUDGES` names each bundled dataset's judge; :func:`judge_for`
  gives it (the extractor name and the classifier) for a dataset name.
* :func:`compute_fidelity`: float ``[-1, 1]`` tensors in, a dict of floats out, never a
  download. ``"inception-v3-compat"`` needs a local weights file. torch-fidelity's own
  extractor opens such a file with ``torch.load(weights_only=False)``; genforge reads it once,
  with ``weights_only=True`` (a file carrying code is refused), and hands the tensors to
  :class:`FeatureExtractorInceptionLocal`, torch-fidelity's Inception network registered under
  ``"genforge-inception-v3"``, which never opens the file. FID from fewer images than the
  features have dimensions (a singular covariance: 65 for the digits CNN, 2,049 for Inception's
  pool features) is computed with a warning saying so.
* :func:`load_real_and_fake`: the two image sets of an evaluation, a bundled dataset's reference
  prepared the way the samples' training images were (a genforge ``samples.npz`` records it).
"""

from __future__ import annotations

from pathlib import Path

import io
import warnings

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genforge.core.errors import one_line
from genforge.data import build_dataset
from genforge.data.transforms import match_channels, signed_to_uint8, uint8_to_signed
from genforge.metrics.digits_classifier import DigitsCNN, load_digits_classifier
from genforge.metrics.mnist_classifier import MNISTCNN, load_mnist_classifier

DIGITS_EXTRACTOR = "digits-cnn"
MNIST_EXTRACTOR = "mnist-cnn"
JUDGES = {"digits": (DIGITS_EXTRACTOR, load_digits_classifier),
          "mnist5k": (MNIST_EXTRACTOR, load_mnist_classifier)}
JUDGE_FEATURE_DIM = {DIGITS_EXTRACTOR: DigitsCNN.feature_dim, MNIST_EXTRACTOR: MNISTCNN.feature_dim}
INCEPTION_EXTRACTOR = "inception-v3-compat"
_LOCAL_INCEPTION = "genforge-inception-v3"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_RESULT_KEYS = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean", torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean", torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
}


class FeatureExtractorDigitsCNN(FeatureExtractorBase):
    """torch-fidelity extractor: uint8 ``(B, 3, H, W)`` -> DigitsCNN ``features`` / ``logits``.

    ``feature_extractor_weights_path`` (torch-fidelity's option) may name another
    safetensors file; by default the shipped weights are used.
    """

    load_judge = staticmethod(load_digits_classifier)
    input_size = 16

    def __init__(self, name: str, features_list: list[str],
                 feature_extractor_weights_path: str | None = None, **kwargs) -> None:
        super().__init__(name, features_list)
        self.cnn = self.load_judge(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @classmethod
    def get_dummy_input_for_compile(cls) -> torch.Tensor:
        return torch.zeros(1, 3, cls.input_size, cls.input_size, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        features = self.cnn.features(uint8_to_signed(x))  # (B, 64)
        out = {"features": features, "logits": self.cnn.head(features)}
        return tuple(out[name] for name in self.features_list)


class FeatureExtractorMNISTCNN(FeatureExtractorDigitsCNN):
    """torch-fidelity extractor: uint8 ``(B, 3, H, W)`` -> MNISTCNN ``features`` / ``logits``."""

    load_judge = staticmethod(load_mnist_classifier)
    input_size = 32


def judge_for(dataset: str) -> tuple[str, torch.nn.Module] | None:
    """``(extractor name, loaded classifier)`` judging samples of ``dataset``, or None."""
    if dataset not in JUDGES:
        return None
    extractor, load = JUDGES[dataset]
    return extractor, load()


class FeatureExtractorInceptionLocal(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3, given its weights as tensors already loaded safely.

    ``inception_state`` is the state dict :func:`load_inception_weights` read with
    ``weights_only=True``. The parent class takes weights only as a path it unpickles with
    ``weights_only=False``, so it is handed an in-memory copy of those tensors instead.
    """

    def __init__(self, name: str, features_list: list[str], inception_state: dict | None = None,
                 **kwargs) -> None:
        if inception_state is None:
            raise ValueError(f"{_LOCAL_INCEPTION!r} needs inception_state (see load_inception_weights)")
        tensors = io.BytesIO()
        torch.save(inception_state, tensors)
        tensors.seek(0)
        kwargs.pop("feature_extractor_weights_path", None)
        super().__init__(name, features_list, feature_extractor_weights_path=tensors, **kwargs)


def _register(name: str, cls) -> None:
    """Register ``cls`` with torch-fidelity; a no-op if it is already there (another class
    under the same name makes torch-fidelity's own registry raise)."""
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__):
        return
    torch_fidelity.register_feature_extractor(name, cls)


def register_digits_feature_extractor() -> None:
    """Register ``"digits-cnn"``, ``"mnist-cnn"`` and the safe local Inception with torch-fidelity."""
    _register(DIGITS_EXTRACTOR, FeatureExtractorDigitsCNN)
    _register(MNIST_EXTRACTOR, FeatureExtractorMNISTCNN)
    _register(_LOCAL_INCEPTION, FeatureExtractorInceptionLocal)


class Uint8Images(Dataset):
    """Float ``[-1, 1]`` images (a tensor or a dataset of them) as torch-fidelity's uint8 RGB."""

    def __init__(self, source: torch.Tensor | Dataset) -> None:
        if torch.is_tensor(source):
            if source.dim() != 4 or source.shape[1] not in (1, 3):
                raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(source.shape)}")
            if source.is_floating_point() and torch.isnan(source).any():
                raise ValueError("images contain NaN")
        elif not isinstance(source, Dataset):
            raise TypeError(f"expected a tensor or a torch Dataset, got {type(source).__name__}")
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.source[i]
        image = item[0] if isinstance(item, (tuple, list)) else item  # datasets yield (image, label)
        if image.dtype != torch.uint8:
            image = signed_to_uint8(image)
        return match_channels(image[None], 3)[0]  # (3, H, W) uint8


def load_inception_weights(path: str | None) -> dict:
    """The Inception state dict at ``path``, read once with ``weights_only=True``."""
    if path is None:
        raise ValueError(
            f"feature_extractor={INCEPTION_EXTRACTOR!r} needs inception_weights=<local file>: genforge "
            "never downloads weights. Fetch torch-fidelity's converted Inception file "
            "(weights-inception-2015-12-05-6726825d.pth, torch-fidelity release v0.2.0) on a "
            "connected machine, copy it here and pass its path (CLI: --inception-weights FILE).")
    if not Path(path).is_file():
        raise FileNotFoundError(f"inception weights file {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # refuses code-carrying pickles
    except Exception as err:  # noqa: BLE001 -- one line naming the file
        raise ValueError(f"inception weights file {path!r} cannot be read safely "
                         f"({one_line(err)})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path!r} is not a state dict of tensors")
    return state


def _feature_dim(feature_extractor: str, feature_layer: str | None) -> int | None:
    """Dimension of the FID features, where known."""
    if feature_extractor in JUDGE_FEATURE_DIM:
        return DigitsCNN.num_classes if feature_layer == "logits" else JUDGE_FEATURE_DIM[feature_extractor]
    if feature_extractor == INCEPTION_EXTRACTOR and (feature_layer or "2048").isdigit():
        return int(feature_layer or "2048")
    return None


def compute_fidelity(real: torch.Tensor | Dataset | None, fake: torch.Tensor | Dataset, *,
                     feature_extractor: str = DIGITS_EXTRACTOR, fid: bool = True, kid: bool = False,
                     isc: bool = False, inception_weights: str | None = None,
                     batch_size: int = 256, feature_layer: str | None = None,
                     progress: bool = False) -> dict[str, float]:
    """FID/KID/IS of ``fake`` against ``real`` (IS on ``fake`` only) via torch-fidelity.

    ``real``/``fake``: float ``(N, C, H, W)`` tensors in [-1, 1] (C = 1 or 3), uint8 tensors,
    or datasets yielding such images (or ``(image, label)``); ``real`` may be None when
    only ``isc`` is asked for. Returns any of ``"fid"``,
    ``"kid_mean"``, ``"kid_std"``, ``"isc_mean"``, ``"isc_std"``. The KID subset size is
    ``min(1000, N_real, N_fake)`` and the IS split count ``min(10, N_fake)``.
    ``feature_layer`` picks the FID/KID feature layer (default: the extractor's own,
    ``"features"`` for digits-cnn, ``"2048"`` for Inception; e.g. ``"64"`` for a quick check).
    ``progress`` shows torch-fidelity's progress bars and messages (its ``verbose``) on stderr.
    """
    if not (fid or kid or isc):
        raise ValueError("nothing to compute: set at least one of fid, kid, isc")
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f"unknown feature extractor {feature_extractor!r}; "
                         f"registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    extractor_kwargs = {}
    if feature_extractor == INCEPTION_EXTRACTOR:
        extractor_kwargs = {"inception_state": load_inception_weights(inception_weights)}
    elif FEATURE_EXTRACTORS_REGISTRY[feature_extractor].__module__.startswith("torch_fidelity."):
        raise ValueError(f"feature extractor {feature_extractor!r} would download its weights; "
                         f"genforge supports {DIGITS_EXTRACTOR!r}, {MNIST_EXTRACTOR!r} and {INCEPTION_EXTRACTOR!r} "
                         "(with a local inception_weights file)")
    elif inception_weights is not None:
        raise ValueError(f"inception_weights is only used with {INCEPTION_EXTRACTOR!r}, "
                         f"not {feature_extractor!r}")
    pairwise = fid or kid
    if pairwise and real is None:
        raise ValueError("FID and KID compare against real images; real=None only works for isc")
    fake_ds = Uint8Images(fake)
    real_ds = Uint8Images(real) if pairwise else None
    n_fake, n_real = len(fake_ds), len(real_ds) if pairwise else 0
    if n_fake < 2 or (pairwise and n_real < 2):
        raise ValueError(f"need at least 2 images per set, got real={n_real}, fake={n_fake}")
    dim = _feature_dim(feature_extractor, feature_layer)
    if fid and dim is not None and min(n_real, n_fake) <= dim:
        warnings.warn(f"FID from {min(n_real, n_fake)} images (real={n_real}, fake={n_fake}) of "
                      f"{dim}-d features: the covariance is singular below {dim + 1} images, so "
                      f"this FID is biased and not comparable to FIDs from more samples",
                      UserWarning, stacklevel=2)
    metrics = torch_fidelity.calculate_metrics(
        input1=fake_ds, input2=real_ds,
        fid=fid, kid=kid, isc=isc,
        feature_extractor=_LOCAL_INCEPTION if extractor_kwargs else feature_extractor,
        **extractor_kwargs, batch_size=batch_size,
        feature_layer_fid=feature_layer, feature_layer_kid=feature_layer,
        kid_subset_size=min(1000, n_real or n_fake, n_fake), isc_splits=min(10, n_fake),
        cuda=torch.cuda.is_available(), cache=False, save_cpu_ram=True, verbose=progress,
    )
    return {_RESULT_KEYS[k]: float(v) for k, v in metrics.items() if k in _RESULT_KEYS}


def images_from_array(array: np.ndarray) -> torch.Tensor:
    """``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` uint8 / float [-1, 1] -> float (N, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(array))
    if x.dim() == 3:
        x = x[:, None]
    elif x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images of shape {tuple(array.shape)}: expected (N, H, W), (N, H, W, C) "
                         "or (N, C, H, W) with C = 1 or 3")
    if x.dtype == torch.uint8:
        return uint8_to_signed(x)
    if not x.is_floating_point():
        raise ValueError(f"images have dtype {array.dtype}; expected uint8 or float in [-1, 1]")
    x = x.float()
    if x.min() < -1.5 or x.max() > 1.5:
        raise ValueError(f"float images span {x.min():.3g}..{x.max():.3g}; expected [-1, 1] "
                         "(store 0..255 pixels as uint8)")
    return x.clamp(-1.0, 1.0)


_BUNDLED_SIZES = {"digits": (8, 16), "mnist5k": (28, 32)}  # name: (native size, default size)


def load_image_source(spec: str, like: torch.Tensor | None = None,
                      resize: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (float [-1, 1], (N, C, H, W)) and labels (or None) named by a CLI ``spec``.

    * ``digits:SPLIT[:SIZE[:MODE]]`` - the bundled digits; SIZE defaults to the size of
      ``like`` (else 16), MODE (``pad`` or ``resize``) to ``resize``, else to ``pad`` at the
      native 8x8; at another size without a MODE the reference is ambiguous: an error;
      ``mnist5k:SPLIT[:SIZE[:MODE]]`` likewise (native 28x28, SIZE defaults to 32);
    * ``FILE.npz`` - array ``images`` (see :func:`images_from_array`) and optional ``labels``
      (and ``resize``, read by :func:`load_real_and_fake`);
    * a folder - every image file in it (recursively), all of one size; no labels.
    """
    name = spec.split(":")[0]
    if name in _BUNDLED_SIZES and ":" in spec:
        native, default = _BUNDLED_SIZES[name]
        parts = spec.split(":")
        if len(parts) > 4:
            raise ValueError(f"bad {name} spec {spec!r}; expected {name}:SPLIT[:SIZE[:MODE]]")
        size = int(parts[2]) if len(parts) > 2 else (like.shape[-1] if like is not None else default)
        mode = parts[3] if len(parts) > 3 else (resize or ("pad" if size == native else None))
        if mode is None:  # the native images grow to SIZE by padding or by resizing: two references
            raise ValueError(
                f"reference {spec!r} at {size}x{size}: the {name} images are {native}x{native}, so say "
                f"how the samples' training images were made, {name}:{parts[1]}:{size}:pad or "
                f"{name}:{parts[1]}:{size}:resize (a genforge samples.npz records it)")
        data = build_dataset(name, split=parts[1], image_size=size, resize=mode)
        return data.images, data.labels
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"samples file {spec!r} does not exist")
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz:
                raise KeyError(f"{spec!r} has no 'images' array (arrays: {sorted(npz.files)})")
            labels = torch.from_numpy(npz["labels"]).long() if "labels" in npz else None
            return images_from_array(npz["images"]), labels
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no image files {IMAGE_SUFFIXES} under {spec!r}")
        from PIL import Image

        arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"images under {spec!r} differ in size; expected one size")
        images = images_from_array(np.stack(arrays))
        grey = bool((images == images[:, :1]).all())
        return (images[:, :1] if grey else images), None
    raise FileNotFoundError(f"image source {spec!r} is not digits:SPLIT, an existing .npz file or a folder")


def recorded_resize(spec: str) -> str | None:
    """How a genforge ``samples.npz`` says its model's training images were sized, or None."""
    if Path(spec).suffix != ".npz" or not Path(spec).is_file():
        return None
    with np.load(spec, allow_pickle=False) as npz:
        return str(npz["resize"]) if "resize" in npz else None


def load_real_and_fake(real_spec: str, fake_spec: str):
    """``(real, fake, fake_labels)``: the samples, and the reference prepared as their training
    images were (same size; for the digits, the ``resize`` mode their samples.npz records)."""
    fake, labels = load_image_source(fake_spec)
    real, _ = load_image_source(real_spec, like=fake, resize=recorded_resize(fake_spec))
    return real, fake, labels
