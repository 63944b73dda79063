"""ENAT (arXiv 2411.06959) and its MaskGIT baseline, as the paper and the official code define them."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from genforge.core.state_dict import StateDictError
from genforge.models.enat import (ENATModel, ReuseCache, convert_official_state_dict, enat_training_loss,
                                  load_official_enat, official_to_genforge_key)
from genforge.models.maskgit import MaskGITModel, iterative_decode, masked_token_loss, random_masking
from genforge.models.maskgit_vqgan import MaskGITVQGAN, load_official_vqgan

FIXTURES = Path(__file__).parents[1] / "fixtures"
REFERENCE = json.loads((FIXTURES / "enat_official_reference.json").read_text())
TINY = REFERENCE["config"]  # L = 16, K = 32, width 64, 4 heads, encoder/decoder 2/1, 10 classes
MASK = TINY["codebook_size"]
L = TINY["num_tokens"]


def tiny_enat(seed: int = 0) -> ENATModel:
    torch.manual_seed(seed)
    model = ENATModel(**TINY).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # leave adaLN-Zero's identity start: every block must matter
        for _, param in model.named_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def masked_ids(batch: int, num_masked: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MASK, (batch, L), generator=generator)
    order = torch.rand(batch, L, generator=generator).argsort(dim=1)
    return torch.where(order < num_masked, MASK, tokens)


def record_lengths(blocks) -> tuple[list, list]:
    lengths, handles = [], []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda m, args: lengths.append(args[0].clone())))
    return lengths, handles


def test_encoder_never_sees_mask_tokens():
    model = tiny_enat()
    ids, labels = masked_ids(2, 11), torch.tensor([3, 7])
    seen, handles = record_lengths(model.encoder_blocks)
    out = model(ids, labels)
    for handle in handles:
        handle.remove()
    mask_row = model.embed(torch.full((1, L), MASK))[0]  # the mask embedding at every position
    assert [x.shape[1] for x in seen] == [L - 11] * len(model.encoder_blocks)
    first = seen[0]
    assert not any(torch.allclose(row, m) for row in first.flatten(0, 1) for m in mask_row)
    # a different [MASK] embedding changes what the decoder predicts but no encoded visible feature
    with torch.no_grad():
        model.embed.word_embeddings.weight[MASK] += 1.0
    changed = model(ids, labels)
    visible = ids != MASK
    assert torch.equal(changed.cache.feat[visible], out.cache.feat[visible])
    assert not torch.allclose(changed.cache.feat[~visible], out.cache.feat[~visible])


def test_feat_at_visible_positions_is_the_encoder_output_and_decoder_queries_are_the_masks():
    model = tiny_enat()
    ids, labels = masked_ids(2, 5), torch.tensor([1, 10])
    encoded = []
    handle = model.encoder_blocks[-1].register_forward_hook(lambda m, a, o: encoded.append(o))
    queries, handles = record_lengths(model.decoder_blocks)
    out = model(ids, labels)
    for h in [handle, *handles]:
        h.remove()
    assert torch.equal(out.cache.feat[ids != MASK], encoded[0].flatten(0, 1))
    assert [q.shape[1] for q in queries] == [5] * len(model.decoder_blocks)


def test_matches_the_official_model_with_and_without_reuse():
    model = tiny_enat()
    labels = torch.tensor(REFERENCE["labels"])
    ids1, ids2 = torch.tensor(REFERENCE["ids_step1"]), torch.tensor(REFERENCE["ids_step2"])
    with torch.no_grad():
        first = model(ids1, labels)
        second = model(ids2, labels, cache=first.cache)
    torch.testing.assert_close(first.logits, torch.tensor(REFERENCE["logits_step1"]), atol=2e-5, rtol=0)
    torch.testing.assert_close(second.logits, torch.tensor(REFERENCE["logits_step2_reuse"]), atol=2e-5, rtol=0)


def test_reuse_encodes_only_newly_revealed_tokens_against_projected_previous_features():
    model = tiny_enat()
    labels = torch.tensor([2, 4])
    before = masked_ids(2, 12, seed=3)
    after = before.clone()
    for row in range(2):  # reveal 5 masked tokens in each row
        where = (before[row] == MASK).nonzero().flatten()[:5]
        after[row, where] = row + 1
    cache = model(before, labels).cache
    seen, handles = record_lengths(model.encoder_blocks)
    reused = model(after, labels, cache=cache)
    for handle in handles:
        handle.remove()
    assert [x.shape[1] for x in seen] == [5] * len(model.encoder_blocks)
    was_visible = before != MASK
    projected = model.prev_proj(cache.feat[was_visible])
    torch.testing.assert_close(reused.cache.feat[was_visible], projected)


def test_a_masked_set_that_is_not_a_subset_of_the_previous_one_is_refused():
    model = tiny_enat()
    labels = torch.tensor([0, 1])
    ids = masked_ids(2, 8)
    cache = model(ids, labels).cache
    remasked = ids.clone()
    for row in range(2):
        where = (ids[row] != MASK).nonzero().flatten()[0]
        remasked[row, where] = MASK
        remasked[row, (ids[row] == MASK).nonzero().flatten()[0]] = 0
    with pytest.raises(ValueError, match="subset of the previous step"):
        model(remasked, labels, cache=cache)


def naive_decode(model, labels, steps, scale, mask_temp, samp_temp, seed):
    """The official NATSchedule.generate written out, recomputing everything each step."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((labels.shape[0], L), MASK)
    null = torch.full_like(labels, TINY["num_classes"])
    weight = 0.0
    for step in range(steps):
        ratio = (step + 1) / steps
        cond, uncond = model(ids, labels).logits, model(ids, null).logits
        logp = torch.log_softmax(cond + weight * (cond - uncond), dim=-1)
        probs = torch.softmax(logp / max(samp_temp * (1 - ratio), 1e-3), dim=-1)
        drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view_as(ids)
        sampled = torch.where(ids == MASK, drawn, ids)
        conf = torch.where(ids == MASK, logp.gather(-1, sampled[..., None])[..., 0], torch.tensor(math.inf))
        u = torch.rand(conf.shape, generator=generator).clamp(1e-20, 1.0)
        conf = conf + mask_temp * (1 - ratio) * -torch.log((-torch.log(u)).clamp_min(1e-20))
        count = math.floor(L * math.cos(math.pi / 2 * ratio))
        remask = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, conf.argsort(dim=1)[:, :count], True)
        ids = torch.where(remask, MASK, sampled)
        weight = ratio * scale
    return sampled


def enat_predictor(model, labels, reuse):
    caches = {"c": ReuseCache(), "u": ReuseCache()}
    null = torch.full_like(labels, TINY["num_classes"])

    def predict(ids, step, guided):
        outs = {}
        for branch, y in (("c", labels), ("u", null)):
            out = model(ids, y, cache=caches[branch] if reuse else None)
            caches[branch], outs[branch] = out.cache, out.logits
        return outs["c"], outs["u"]

    return predict


@torch.no_grad()
def test_decoding_without_reuse_equals_recomputing_everything_each_step():
    model, labels = tiny_enat(), torch.tensor([0, 5, 9])
    ours = iterative_decode(enat_predictor(model, labels, reuse=False), 3, L, MASK, steps=4, guidance_scale=2.5,
                            mask_temp=1.5, samp_temp=6.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ours, naive_decode(model, labels, 4, 2.5, 1.5, 6.0, seed=7))


@torch.no_grad()
def test_each_step_leaves_the_scheduled_mask_count_never_remasks_and_ends_unmasked():
    model, labels = tiny_enat(), torch.tensor([1, 2, 3, 4])
    history, weights = [], []

    def callback(step, ids, weight):
        history.append(ids.clone())
        weights.append(weight)

    final = iterative_decode(enat_predictor(model, labels, reuse=True), 4, L, MASK, steps=4, guidance_scale=2.5,
                             generator=torch.Generator().manual_seed(0), callback=callback)
    for step, ids in enumerate(history):
        expected = math.floor(L * math.cos(math.pi / 2 * (step + 1) / 4))
        assert (ids == MASK).sum(dim=1).tolist() == [expected] * 4
        if step:
            revealed = history[step - 1] != MASK
            assert torch.equal(ids[revealed], history[step - 1][revealed])
    assert not (final == MASK).any() and final.max() < MASK
    assert torch.equal(final[history[-2] != MASK], history[-2][history[-2] != MASK])
    assert weights[0] == 0.0 and weights == [2.5 * s / 4 for s in range(4)]


def test_training_masks_one_count_per_batch_in_one_to_L_minus_one():
    torch.manual_seed(0)
    tokens = torch.randint(0, MASK, (8, L))
    counts = []
    for _ in range(400):
        per_row = (random_masking(tokens, MASK) == MASK).sum(dim=1)
        assert (per_row == per_row[0]).all()
        counts.append(int(per_row[0]))
    assert 1 <= min(counts) and max(counts) <= L - 1
    assert abs(sum(counts) / len(counts) / L - 0.8) < 0.03  # Beta(12, 3) has mean 0.8


def test_loss_counts_only_masked_positions_with_label_smoothing():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, L, MASK), torch.randint(0, MASK, (2, L))
    masked = torch.rand(2, L) < 0.5
    loss = masked_token_loss(logits, targets, masked)
    changed = torch.where(masked[..., None], logits, torch.randn_like(logits) * 10)
    assert torch.equal(masked_token_loss(changed, targets, masked), loss)
    logp = torch.log_softmax(logits, dim=-1)
    smoothed = 0.9 * F.one_hot(targets, MASK) + 0.1 / MASK
    naive = -(smoothed * logp).sum(-1)[masked].mean()
    torch.testing.assert_close(loss, naive)


def test_maskgit_runs_every_token_mask_included_through_every_block():
    torch.manual_seed(0)
    model = MaskGITModel(codebook_size=MASK, num_tokens=L, num_classes=10, width=64, depth=3, num_heads=4).eval()
    seen, handles = record_lengths(model.blocks)
    model(masked_ids(2, 11), torch.tensor([0, 1]))
    assert [x.shape[1] for x in seen] == [L] * 3


def test_training_step_with_simulated_previous_step_uses_the_ema_cache():
    model, ema = tiny_enat(0).train(), tiny_enat(1).eval()
    tokens, labels = torch.randint(0, MASK, (4, L)), torch.tensor([0, 1, 2, 3])
    calls = []
    handle = ema.register_forward_hook(lambda m, a, o: calls.append(a[0]))
    torch.manual_seed(0)
    losses = [enat_training_loss(model, ema, tokens, labels, reuse_prob=p) for p in (1.0, 0.0)]
    handle.remove()
    assert len(calls) == 1  # only the reuse_prob=1 step ran the EMA model
    assert all(torch.isfinite(loss) and loss.requires_grad for loss in losses)
    assert not any(p.grad is not None for p in ema.parameters())


def test_save_and_load_round_trip(tmp_path):
    model, ids, labels = tiny_enat(), masked_ids(2, 9), torch.tensor([3, 10])
    model.save_pretrained(tmp_path / "enat")
    loaded = ENATModel.from_pretrained(tmp_path / "enat").eval()
    assert torch.equal(loaded(ids, labels).logits, model(ids, labels).logits)


def test_official_enat_l_layout_maps_onto_ours_key_for_key():
    official = json.loads((FIXTURES / "enat_official_keys.json").read_text())["keys"]
    with torch.device("meta"):
        ours = ENATModel()  # ENAT-L, 256 px
    state = convert_official_state_dict({k: torch.empty(s, device="meta") for k, s in official.items()}, 22)
    expected = ours.state_dict()
    assert set(state) == set(expected)
    assert all(tuple(state[k].shape) == tuple(expected[k].shape) for k in expected)
    assert all(official_to_genforge_key(k, 22) is None for k in official if k.startswith("prev_embedder."))


def official_tiny_state(model: ENATModel) -> dict:
    """``model``'s weights in the official layout (with its unused prev_embedder)."""
    d = TINY["width"]
    state = {"prev_embedder.fc1.weight": torch.zeros(4 * d, d), "prev_embedder.fc1.bias": torch.zeros(4 * d),
             "prev_embedder.fc2.weight": torch.zeros(d, 4 * d), "prev_embedder.fc2.bias": torch.zeros(d)}
    ours = model.state_dict()
    for key in json.loads((FIXTURES / "enat_official_keys.json").read_text())["keys"]:
        new = official_to_genforge_key(key, TINY["encoder_depth"])
        if new in ours:  # ENAT-L's blocks 3..23 do not exist in the tiny model
            state[key] = ours[new].reshape(1, 1, -1) if key == "mlm_layer.bias" else ours[new]
    return state


def test_official_checkpoint_loads_strictly_and_a_missing_key_is_named(tmp_path):
    model = tiny_enat()
    state = official_tiny_state(model)
    save_file(state, tmp_path / "enat.safetensors")
    loaded = load_official_enat(tmp_path / "enat.safetensors", **TINY).eval()
    ids, labels = masked_ids(2, 9), torch.tensor([3, 10])
    assert torch.equal(loaded(ids, labels).logits, model(ids, labels).logits)
    del state["blocks.2.attn.kv.A.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(StateDictError, match="decoder_blocks.0.kv_context.weight"):
        load_official_enat(tmp_path / "broken.safetensors", **TINY)


def test_bad_input_gives_clear_errors():
    model, labels = tiny_enat(), torch.tensor([0, 1])
    ids = masked_ids(2, 4)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 32\].*got values in \[\d+, 33\]"):
        model(ids.clone().index_fill_(1, torch.tensor([0]), MASK + 1), labels)
    with pytest.raises(ValueError, match="same number of \\[MASK\\] tokens in every batch row.*\\[4, 5\\]"):
        uneven = ids.clone()
        uneven[1, (ids[1] != MASK).nonzero().flatten()[0]] = MASK
        model(uneven, labels)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1; got 0"):
        iterative_decode(enat_predictor(model, labels, True), 2, L, MASK, steps=0)
    with pytest.raises(ValueError, match="class labels"):
        model(ids, torch.tensor([0, 11]))


VQGAN_REFERENCE = json.loads((FIXTURES / "maskgit_vqgan_official_reference.json").read_text())


def tiny_vqgan() -> MaskGITVQGAN:
    torch.manual_seed(0)
    model = MaskGITVQGAN(**VQGAN_REFERENCE["config"]).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def test_maskgit_vqgan_tokenizes_and_decodes_as_the_official_one():
    model = tiny_vqgan()
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ids = model.encode(images)
        decoded = model.decode(ids, 8, 8)
    assert ids.tolist() == VQGAN_REFERENCE["ids"]
    torch.testing.assert_close(decoded.flatten(), torch.tensor(VQGAN_REFERENCE["decoded"]), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 63\]"):
        model.decode(ids + 64, 8, 8)


def test_official_vqgan_layout_is_ours_and_loads_strictly(tmp_path):
    official = json.loads((FIXTURES / "maskgit_vqgan_official_keys.json").read_text())["keys"]
    with torch.device("meta"):
        ours = MaskGITVQGAN()  # vq-f16-jax.yaml
    assert {k: list(v.shape) for k, v in ours.state_dict().items()} == official
    model = tiny_vqgan()
    state = dict(model.state_dict())
    save_file(state, tmp_path / "vq.safetensors")
    loaded = load_official_vqgan(tmp_path / "vq.safetensors", **VQGAN_REFERENCE["config"])
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    del state["decoder.up.1.upsample.conv.bias"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(StateDictError, match="decoder.up.1.upsample.conv.bias"):
        load_official_vqgan(tmp_path / "broken.safetensors", **VQGAN_REFERENCE["config"])


def test_ddp_training_alternating_reuse_needs_and_has_find_unused_parameters(gloo_group):
    """A training step without the simulated previous step leaves PrevProj and the previous-feature
    projections without gradient; the next step, with one, uses them. DDP refuses that unless
    find_unused_parameters is set (as the official training does), and the enat method sets it."""
    from torch.nn.parallel import DistributedDataParallel

    from genforge.methods.masked_tokens import ENATMethod

    tokens, labels = torch.randint(0, MASK, (4, L)), torch.tensor([0, 1, 2, 3])

    def steps(find_unused: bool) -> dict:
        model = tiny_enat(0).train()
        wrapped = DistributedDataParallel(model, find_unused_parameters=find_unused)
        torch.manual_seed(0)
        for reuse_prob in (0.0, 1.0):
            model.zero_grad(set_to_none=True)
            enat_training_loss(wrapped, tiny_enat(1).eval(), tokens, labels, reuse_prob=reuse_prob).backward()
        return {name: p.grad for name, p in model.named_parameters()}

    grads = steps(ENATMethod.find_unused_parameters)
    prev = [g for name, g in grads.items() if name.startswith("prev_proj.")]
    assert prev and all(g is not None and g.abs().sum() > 0 for g in prev)  # the reuse step trains PrevProj
    with pytest.raises(RuntimeError, match="unused parameters|finished reduction"):
        steps(False)
