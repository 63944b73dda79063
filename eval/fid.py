"""FID (and optionally KID / IS) of generated samples against real images, via torch-fidelity.

FID: Heusel et al. 2017 (arXiv:1706.08500); computed by torch-fidelity
(https://github.com/toshas/torch-fidelity) through :func:`genforge.metrics.compute_fidelity`.

    python eval/fid.py --real digits:test --fake samples.npz [--kid] [--isc] [--json out.json]
    python eval/fid.py --real folder_a --fake folder_b --extractor inception-v3-compat \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth

Sources: ``digits:SPLIT[:SIZE[:pad|resize]]`` (SIZE defaults to the fake images' size),
an ``.npz`` with ``images`` (N,H,W[,C] uint8 or float in [-1, 1]) or a folder of images.
Nothing is downloaded; Inception needs a local weights file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from genforge.metrics import DIGITS_EXTRACTOR, compute_fidelity, load_real_and_fake


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--real", required=True, help="digits:SPLIT[:SIZE[:MODE]], FILE.npz or folder")
    parser.add_argument("--fake", required=True, help="FILE.npz or folder of generated samples")
    parser.add_argument("--extractor", default=DIGITS_EXTRACTOR,
                        choices=[DIGITS_EXTRACTOR, "inception-v3-compat"], help="feature extractor")
    parser.add_argument("--inception-weights", help="local Inception weights file (no download)")
    parser.add_argument("--feature-layer", help="FID/KID feature layer; the extractor's own when not given")
    parser.add_argument("--kid", action="store_true", help="also compute KID")
    parser.add_argument("--isc", action="store_true", help="also compute the Inception Score")
    parser.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    real, fake, _ = load_real_and_fake(args.real, args.fake)
    results = compute_fidelity(real, fake, feature_extractor=args.extractor, kid=args.kid,
                               isc=args.isc, inception_weights=args.inception_weights,
                               batch_size=args.batch_size, feature_layer=args.feature_layer,
                               progress=not args.no_progress)
    print(f"{'metric':<10} {'value':>14}   ({args.extractor}; real={args.real} n={len(real)}, "
          f"fake={args.fake} n={len(fake)})")
    for name, value in results.items():
        print(f"{name:<10} {value:>14.6g}")
    if args.json is not None:
        record = {"real": args.real, "fake": args.fake, "extractor": args.extractor,
                  "n_real": len(real), "n_fake": len(fake), **results}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return results


if __name__ == "__main__":
    from genforge.cli import run_script

    sys.exit(run_script(main, sys.argv[1:]))
