"""Layer-wise lr decay and weight decay for every vision tower, on the exact parameter names of the real modules:
transformers' CLIPVisionModel / SiglipVisionModel (as LLM2CLIPModel holds them) and our EVA02."""

import math

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from llm2clip_hf.modeling import EVA02VisionModel
from llm2clip_hf.testing import tiny_vision_config
from llm2clip_hf.trainers import layer_decay_parameter_groups

LR, WD, DECAY, DEPTH = 0.1, 0.05, 0.5, 3

# Expected layer id and weight decay per name, written out per family (the formula, not the implementation's regexes).
# Layer ids: stem (embeddings, pre-LayerNorm) 0, block N -> N + 1, everything after -> DEPTH + 1.
NO_DECAY_NAMES = {
    "vision_model.cls_token", "vision_model.pos_embed",
    "vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding.weight",
    "vision_model.head.probe", "logit_scale", "logit_bias",
}


def expected_layer(name):
    if not name.startswith("vision_model."):
        return DEPTH + 1  # projection, logit_scale / logit_bias: full rate
    relative = name[len("vision_model."):]
    stem = ("embeddings.", "pre_layrnorm.", "patch_embed.", "pos_embed", "cls_token")
    if relative.startswith(stem):
        return 0
    parts = relative.split(".")
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    if parts[:2] == ["encoder", "layers"]:
        return int(parts[2]) + 1
    return DEPTH + 1


def expected_decay(name, parameter):
    return not (parameter.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY_NAMES)


class Wrapper(nn.Module):
    """A stand-in for LLM2CLIPModel with the real tower, so parameter names are those inside the model."""

    def __init__(self, tower, projection_width=None, projection_bias=False, logit_bias=False):
        super().__init__()
        self.vision_model = tower
        if projection_width is not None:
            self.visual_projection = nn.Linear(projection_width, 16, bias=projection_bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        if logit_bias:
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.config = type("Config", (), {"vision_config": tower.config})()


def clip_wrapper():
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=2,
                              image_size=16, patch_size=8)
    return Wrapper(CLIPVisionModel(config), projection_width=32)


def siglip_wrapper():
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=2,
                                image_size=16, patch_size=8)
    return Wrapper(SiglipVisionModel(config), logit_bias=True)


def eva02_wrapper():
    return Wrapper(EVA02VisionModel(tiny_vision_config(num_hidden_layers=DEPTH)), projection_width=64,
                   projection_bias=True, logit_bias=True)


WRAPPERS = {"clip": clip_wrapper, "siglip": siglip_wrapper, "eva02": eva02_wrapper}

# Names the test must see, so a renamed module in transformers cannot make it pass vacuously.
MUST_HAVE = {
    "clip": {"vision_model.embeddings.class_embedding": (0, False),
             "vision_model.embeddings.patch_embedding.weight": (0, True),
             "vision_model.embeddings.position_embedding.weight": (0, False),
             "vision_model.pre_layrnorm.weight": (0, False),
             "vision_model.encoder.layers.0.self_attn.q_proj.weight": (1, True),
             f"vision_model.encoder.layers.{DEPTH - 1}.mlp.fc2.bias": (DEPTH, False),
             "vision_model.post_layernorm.weight": (DEPTH + 1, False),
             "visual_projection.weight": (DEPTH + 1, True),
             "logit_scale": (DEPTH + 1, False)},
    "siglip": {"vision_model.embeddings.patch_embedding.weight": (0, True),
               "vision_model.embeddings.patch_embedding.bias": (0, False),
               "vision_model.embeddings.position_embedding.weight": (0, False),
               "vision_model.encoder.layers.1.layer_norm1.weight": (2, False),
               f"vision_model.encoder.layers.{DEPTH - 1}.mlp.fc1.weight": (DEPTH, True),
               "vision_model.post_layernorm.weight": (DEPTH + 1, False),
               "vision_model.head.probe": (DEPTH + 1, False),
               "vision_model.head.attention.in_proj_weight": (DEPTH + 1, True),
               "vision_model.head.attention.in_proj_bias": (DEPTH + 1, False),
               "vision_model.head.layernorm.weight": (DEPTH + 1, False),
               "vision_model.head.mlp.fc2.weight": (DEPTH + 1, True),
               "logit_bias": (DEPTH + 1, False)},
    "eva02": {"vision_model.cls_token": (0, False), "vision_model.pos_embed": (0, False),
              "vision_model.patch_embed.proj.weight": (0, True),
              "vision_model.blocks.0.attn.q_proj.weight": (1, True),
              f"vision_model.blocks.{DEPTH - 1}.norm1.weight": (DEPTH, False),
              "vision_model.norm.weight": (DEPTH + 1, False),
              "visual_projection.bias": (DEPTH + 1, False)},
}


def settings_by_name(groups):
    return {name: (group["lr"], group["weight_decay"]) for group in groups for name in group["names"]}


@pytest.mark.parametrize("family", list(WRAPPERS))
def test_every_parameter_gets_the_official_lr_scale_and_weight_decay(family):
    torch.manual_seed(0)
    model = WRAPPERS[family]()
    groups = layer_decay_parameter_groups(model, LR, WD, DECAY)  # depth read from model.config.vision_config
    settings = settings_by_name(groups)
    parameters = dict(model.named_parameters())
    for name, (layer, decay) in MUST_HAVE[family].items():
        assert name in parameters, f"{name} is not a parameter of the {family} tower any more"
        assert expected_layer(name) == layer and expected_decay(name, parameters[name]) == decay, name
    for name, parameter in parameters.items():
        layer = expected_layer(name)
        want = (LR * DECAY ** (DEPTH + 1 - layer), WD if expected_decay(name, parameter) else 0.0)
        assert settings[name][0] == pytest.approx(want[0], rel=1e-12) and settings[name][1] == want[1], (
            name, settings[name], want)
    # every layer id 0 .. DEPTH + 1 occurs, so the decay really spreads over the tower
    assert {expected_layer(n) for n in parameters if n.startswith("vision_model.")} == set(range(DEPTH + 2))


@pytest.mark.parametrize("family", list(WRAPPERS))
def test_every_trainable_parameter_is_in_exactly_one_group(family):
    model = WRAPPERS[family]()
    frozen = "vision_model.embeddings.patch_embedding.weight" if family != "eva02" else "vision_model.cls_token"
    model.get_parameter(frozen).requires_grad_(False)
    groups = layer_decay_parameter_groups(model, LR, WD, DECAY, DEPTH)
    grouped = [id(p) for group in groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == set(trainable)
    for group in groups:
        assert len(group["params"]) == len(group["names"])
        assert all(model.get_parameter(n) is p for n, p in zip(group["names"], group["params"]))
    assert frozen not in {n for group in groups for n in group["names"]}
    # parameters of one group share lr and weight decay; no two groups share both
    keys = [(group["lr"], group["weight_decay"]) for group in groups]
    assert len(keys) == len(set(keys))
    torch.optim.AdamW(groups)  # the groups are valid optimizer groups ("names" included)


def test_block_index_beyond_the_given_depth_is_refused():
    """A depth that is not the vision tower's (the LLM's, say) would silently mis-assign layers."""
    with pytest.raises(ValueError, match="num_hidden_layers"):
        layer_decay_parameter_groups(clip_wrapper(), LR, WD, DECAY, num_vision_layers=DEPTH - 1)
