"""Zero-initialised interaction, and what one optimiser step may change in each stage."""

from __future__ import annotations

import pytest
import torch

from fwmodel.model import FantasyWorldModel
from fwmodel.stages import set_trainable, trainable_module_names, trainable_parameter_names, trainable_parameters


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_video_prediction_equals_frozen_wan_at_init(variant, tiny_config, i2v_config, inputs_for):
    config = tiny_config if variant == "t2v" else i2v_config
    torch.manual_seed(0)
    model = FantasyWorldModel(config).eval()
    x = inputs_for(config, num_latent_frames=3)  # with Plucker rays: the camera adapters run too
    latents = x["latents"] if "condition" not in x else torch.cat([x["latents"], x["condition"]], dim=1)
    with torch.no_grad():
        ours = model(**x)["video"]
        frozen_wan = model.backbone.wan(latents, x["timestep"], x["text"], x.get("image_embeds")).sample
    assert torch.equal(ours, frozen_wan)


def _loss(out: dict) -> torch.Tensor:
    terms = [out[k].float().pow(2).mean() for k in ("depth", "points")]
    terms += [out[k].log().mean() for k in ("depth_conf", "points_conf")]
    terms += [p.pow(2).mean() for p in out["pose_enc_list"]]
    if out["video"] is not None:
        terms.append(out["video"].pow(2).mean())
    return sum(terms)


@pytest.mark.parametrize("stage", [1, 2])
def test_one_step_changes_only_the_stage_parameters(stage, tiny_config, inputs_for):
    torch.manual_seed(0)
    model = FantasyWorldModel(tiny_config)
    set_trainable(model, stage)
    expected = set(trainable_parameter_names(model, stage))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert not any(n.startswith("backbone.") for n in trainable)
    if stage == 1:
        assert all(n.startswith("geometry.") for n in trainable)
    else:
        assert any(n.startswith("interaction.bicross.") for n in trainable)
        assert any(n.startswith("interaction.camera_adapters.") for n in trainable)

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    x = inputs_for(tiny_config, num_latent_frames=2)
    _loss(model(**x)).backward()  # full forward: video, interaction and camera conditioning all run
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == expected  # frozen modules never receive gradients; every trainable one does
    optimizer.step()

    state_ids = {id(p) for p in optimizer.state}
    assert state_ids <= {id(p) for p in params}  # frozen parameters never get optimiser state
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= expected
    for module in trainable_module_names(model, stage):  # every trained module moved
        assert any(n.startswith(module + ".") for n in changed), module

    # After a Stage-2 step the gates are open: the video prediction now differs from frozen Wan.
    with torch.no_grad():
        video = model(**x)["video"]
        frozen = model.backbone.wan(x["latents"], x["timestep"], x["text"]).sample
    assert torch.equal(video, frozen) == (stage == 1)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, inputs_for):
    torch.manual_seed(0)
    model = FantasyWorldModel(tiny_config).train()
    assert not model.backbone.training
    set_trainable(model, 2)
    x = inputs_for(tiny_config, num_latent_frames=1)

    def gradients(checkpointing: bool) -> dict:
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        _loss(model(**x)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)
