"""Linear probes on digits: DiMR features (DiffusionClassifier) vs raw pixels vs a trained CNN.

"Diffusion Models Beat GANs on Image Classification" (Mukhopadhyay et al., arXiv 2307.08702)
reads a trained diffusion network's activations at one block and one noise level as image
features. Here the network is the DiMR that ``genforge train recipes/dimr/digits.yaml``
saves, the digits are noised to timestep t with one fixed eps per seed, and the chosen
block's 4x4 token grid is the feature. Every feature set gets the same linear probe
(standardised features, softmax regression, full-batch L-BFGS with an L2 penalty) trained
on the train split and scored on the test split; seeds change the diffusion noise. The
baselines are the 64 raw pixels and the 64-d penultimate features of the digits CNN
(genforge.metrics, trained with labels on the same split).

    python eval/benchmarks/diffusion_probe.py --pipeline runs/dimr_digits/pipeline
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from genforge import DiMRPipeline
from genforge.methods.diffusion_probe import DiffusionClassifier
from genforge.data import build_dataset
from genforge.metrics import load_digits_classifier


def linear_probe(train_x, train_y, test_x, test_y, l2: float = 1e-3, seed: int = 0) -> float:
    """Test accuracy of softmax regression on standardised features (full-batch L-BFGS)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(seed)
    linear = torch.nn.Linear(train_x.shape[1], 10)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(train_x), train_y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((linear(test_x).argmax(1) == test_y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="runs/dimr_digits/pipeline")
    parser.add_argument("--layers", nargs="+", default=["stages.0.blocks.0", "stages.0.blocks.2", "stages.0.blocks.4",
                                                        "stages.1.blocks.0"])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 50, 100, 200, 400])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pool-size", type=int, default=4)
    args = parser.parse_args()

    pipe = DiMRPipeline.from_pretrained(args.pipeline)
    train, test = build_dataset("digits", split="train"), build_dataset("digits", split="test")
    rows = {}
    rows["raw pixels (64)"] = [linear_probe(train.images.flatten(1), train.labels, test.images.flatten(1),
                                            test.labels, seed=s) for s in args.seeds]
    cnn = load_digits_classifier().eval()
    with torch.no_grad():
        cnn_train, cnn_test = cnn.features(train.images), cnn.features(test.images)
    rows["digits CNN features (64, supervised)"] = [linear_probe(cnn_train, train.labels, cnn_test, test.labels,
                                                                 seed=s) for s in args.seeds]
    for layer in args.layers:
        for t in args.timesteps:
            accs = []
            for seed in args.seeds:
                probe = DiffusionClassifier(pipe.model, 10, layer, t, pool_size=args.pool_size,
                                            scheduler=pipe.scheduler, noise_seed=seed)
                with torch.no_grad():
                    f_train, f_test = probe.features(train.images).flatten(1), probe.features(test.images).flatten(1)
                accs.append(linear_probe(f_train, train.labels, f_test, test.labels, seed=seed))
            rows[f"DiMR {layer}, t={t} ({f_train.shape[1]})"] = accs
            print(f"DiMR {layer} t={t}: {100 * statistics.fmean(accs):.2f}", flush=True)

    print(f"\nLinear-probe test accuracy on digits (%), mean ± std over seeds {args.seeds}")
    print("| features (dimension) | test accuracy |")
    print("|---|---|")
    for name, accs in rows.items():
        print(f"| {name} | {100 * statistics.fmean(accs):.2f} ± {100 * statistics.pstdev(accs):.2f} |")


if __name__ == "__main__":
    main()
