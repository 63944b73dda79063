"""Evaluation metrics: FID/KID/IS through torch-fidelity, and the digits and MNIST judges.

Importing this package registers the ``"digits-cnn"`` and ``"mnist-cnn"`` feature extractors with torch-fidelity
(Obukhov et al., https://github.com/toshas/torch-fidelity); importing it again is harmless.
See :mod:`genforge.metrics.fidelity` (FID, Heusel et al. 2017, arXiv:1706.08500),
:mod:`genforge.metrics.digits_classifier`, :mod:`genforge.metrics.mnist_classifier` and :mod:`genforge.metrics.agreement`.
"""

from genforge.metrics.agreement import classifier_agreement, per_class_agreement
from genforge.metrics.calibration import ReliabilityDiagram, expected_calibration_error, reliability_diagram
from genforge.metrics.digits_classifier import (
    DigitsCNN,
    digits_test_accuracy,
    load_digits_classifier,
    train_digits_classifier,
)
from genforge.metrics.fidelity import (
    DIGITS_EXTRACTOR,
    JUDGES,
    MNIST_EXTRACTOR,
    FeatureExtractorDigitsCNN,
    FeatureExtractorMNISTCNN,
    compute_fidelity,
    images_from_array,
    judge_for,
    load_image_source,
    load_inception_weights,
    load_real_and_fake,
    register_digits_feature_extractor,
)

from genforge.metrics.mnist_classifier import (
    MNISTCNN,
    load_mnist_classifier,
    mnist_test_accuracy,
    train_mnist_classifier,
)

register_digits_feature_extractor()

__all__ = [
    "DIGITS_EXTRACTOR", "DigitsCNN", "FeatureExtractorDigitsCNN", "FeatureExtractorMNISTCNN", "JUDGES",
    "MNISTCNN", "MNIST_EXTRACTOR", "ReliabilityDiagram", "judge_for", "load_mnist_classifier",
    "mnist_test_accuracy", "train_mnist_classifier",
    "classifier_agreement", "compute_fidelity", "digits_test_accuracy", "expected_calibration_error",
    "images_from_array", "load_digits_classifier", "load_image_source", "load_inception_weights",
    "load_real_and_fake", "per_class_agreement",
    "register_digits_feature_extractor", "reliability_diagram", "train_digits_classifier",
]
