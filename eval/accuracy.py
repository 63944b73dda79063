"""Digits-CNN accuracy on the digits test split, or classifier agreement of generated samples.

    python eval/accuracy.py                              # shipped CNN on the test split
    python eval/accuracy.py --samples samples.npz        # agreement with the stored labels
    python eval/accuracy.py --weights my_cnn.safetensors --json out.json

Agreement (share of samples classified as their conditioning label) is the classifier-based
check of class-conditional generators (Ravuri & Vinyals 2019, arXiv:1905.10887); the logic
lives in :mod:`genforge.metrics.agreement`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from genforge.metrics import (
    classifier_agreement,
    digits_test_accuracy,
    load_digits_classifier,
    load_image_source,
    per_class_agreement,
)
from genforge.metrics.digits_classifier import LAYOUTS


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", help=".npz with `images` and `labels` (omit: test-split accuracy)")
    parser.add_argument("--weights", help="DigitsCNN safetensors file (default: the shipped one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    classifier = load_digits_classifier(args.weights)
    if args.samples is None:
        record = {f"test_accuracy_{mode}": digits_test_accuracy(classifier, mode) for mode in LAYOUTS}
        rows = list(record.items())
    else:
        images, labels = load_image_source(args.samples)
        if labels is None:
            raise ValueError(f"{args.samples!r} has no `labels` array; agreement needs the "
                             "conditioning labels")
        per_class = per_class_agreement(images, labels, classifier)
        record = {"samples": args.samples, "n": len(labels),
                  "agreement": classifier_agreement(images, labels, classifier),
                  "per_class": [None if math.isnan(v) else v for v in per_class.tolist()]}
        rows = [("agreement", record["agreement"])]
        rows += [(f"class {c}", v) for c, v in enumerate(record["per_class"]) if v is not None]
    print(f"{'metric':<22} {'value':>8}")
    for name, value in rows:
        print(f"{name:<22} {value:>8.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    from genforge.cli import run_script

    sys.exit(run_script(main, sys.argv[1:]))
