"""Presets and recipes: the settings a job takes, by name, over the config's defaults.

The built-in dataset's presets (`SHAPES_PRESET` for train.py with no --data,
`FINETUNE_SHAPES_PRESET` for finetune.py on such a run) and the published recipes of
`--recipe NAME` (`RECIPES`). They are one layer of a job's configuration: over the defaults,
under the source or resumed run and the command line (fixres/layers.py stacks them).

    python train.py --data /imagenet --recipe tv-resnet50-v2              # torchvision's ResNet-50 V2
    python train.py --data /imagenet --recipe tv-resnet50-v2 --epochs 90  # the same, shorter
"""
from __future__ import annotations


# --recipe: published recipes as presets; an option given on the command line wins over them.
# torchvision's ResNet-50 IMAGENET1K_V2 weights (80.858% top-1): its blog post "How to Train
# State-of-the-Art Models Using TorchVision's Latest Primitives" and references/classification.
# FixRes's "train low, test high" as practised today: crops of 176 in training, 224 at test.
TV_RESNET50_V2 = dict(
    model="tv:resnet50",
    train_res=176,             # train_crop_size
    test_res=224,              # val_crop_size
    crop_pct=224 / 232,        # val_resize_size 232: Resize(232) + CenterCrop(224)
    interpolation="bilinear",
    epochs=600,
    batch_size=128,            # per process, on 8 GPUs: 1024 images per optimizer step
    optimizer="sgd",           # momentum 0.9 (theirs plain, ours Nesterov: docs/recipes.md)
    momentum=0.9,
    lr=0.5,                    # for 1024 images per step
    warmup_epochs=5,           # linear, then cosine to 0
    weight_decay=2e-5,         # none on norm layers (ours: none on biases either)
    label_smoothing=0.1,
    auto_augment="ta_wide",
    random_erase=0.1,
    mixup_alpha=0.2,
    cutmix_alpha=1.0,
    model_ema=True,
    model_ema_steps=32,
    # torchvision's train.py turns its --model-ema-decay 0.99998 into a decay per update,
    # 1 - (1 - 0.99998) * images per update / epochs (the average then spans the same share
    # of runs of any length): 0.99891 for 8 x 128 images per step, 32 steps, 600 epochs
    model_ema_decay=1 - (1 - 0.99998) * 8 * 128 * 32 / 600,
)

# The built-in data's recipes for the model families without BatchNorm by default
# (docs/families.md; docs/shapes-lab.md: what was tried). Stock LayerNorm test_convnext and
# test_vit stay near chance here in 15-26 CPU epochs at any learning rate; these variants learn.
# A ConvNeXt with BatchNorm, ReLU and an overlapping conv stem (timm's own options): its head is
# still timm's NormMlpClassifierHead, a norm then the classifier, which finetune.py adapts.
SHAPES_CONVNEXT = dict(
    model="test_convnext",
    model_kwargs=dict(stem_type="overlap_act", norm_layer="batchnorm2d", conv_mlp=True, act_layer="relu",
                      ls_init_value=None),
    lr=2e-3,
    warmup_epochs=1,
    min_scale=0.35,  # 0.08's crops of a 128 px image leave too little for a stride-32 net at 64 px
    epochs=26,
)
# A hybrid ViT (timm's ResNet stem, then transformer blocks on 2x2 patches of its stride-4 map):
# 8 px per token, 8x8 = 64 tokens at 64 px. Its last norm is a LayerNorm (fc_norm, before the average pool),
# so fine-tuning adapts a LayerNorm and the head. Patch-embedding ViTs (test_vit, patch 4-8) were
# too slow or stayed near chance on this CPU.
SHAPES_VIT = dict(
    model="vit_tiny_r_s16_p8_224",
    model_kwargs=dict(patch_size=2, embed_dim=64, depth=6, num_heads=2, global_pool="avg", class_token=False),
    lr=5e-4,
    warmup_epochs=2,
    min_scale=0.35,
    clip_grad_norm=1.0,
    epochs=30,
)
RECIPES = {"tv-resnet50-v2": TV_RESNET50_V2, "shapes-convnext": SHAPES_CONVNEXT, "shapes-vit": SHAPES_VIT}


# The built-in dataset's defaults: a well-fitted model in minutes on a CPU, whose sweep shows
# the FixRes effect (docs/shapes-lab.md: what was tried).
SHAPES_PRESET = dict(
    model="test_resnet",   # timm's 0.4M-parameter ResNet: fast enough to train on a CPU
    output_stride=8,       # an 8x8 last feature map at 64 px; stride 32's 2x2 turns the sweep into a saw-tooth
    train_res=64,          # stored images are 128 px, so the sweep can go up to 2x
    min_scale=0.08,        # the paper's RandomResizedCrop: the zoom FixRes corrects
    crop_pct=1.0,          # test on the whole frame (timm's test_crop_pct for its ResNets): the object as framed
    epochs=15,             # the last epochs still add
    lr=3e-3,               # AdamW with batch 32
    batch_size=32,
    weight_decay=0.05,
    workers=1,             # decoding 128 px JPEGs is cheap; one worker keeps a core for compute
)

# finetune.py on a run of the built-in data: few steps an epoch where the reference's settings
# assume ImageNet's thousands, so a longer, stronger fine-tune (docs/shapes-lab.md: what was tried)
FINETUNE_SHAPES_PRESET = dict(lr=0.05, epochs=10)


# A preset's or recipe's options that fit its model only: left out when another model is asked for
MODEL_OPTIONS = ("output_stride", "model_kwargs")


def train_preset(given: dict) -> dict:
    """train.py's defaults for the options not given: the built-in dataset's preset when there
    is no --data, and --recipe's settings over it. A preset's or recipe's model options go with
    its model: `--model test_vit` (or a recipe's model) gets no --output-stride it may not take,
    and `--recipe shapes-vit --model test_vit` not the hybrid ViT's constructor keywords."""
    if not isinstance(given, dict):  # a config built by hand: train.py's job takes what was typed
        raise TypeError(f"the options given as a dict (fixres.layers.parse_command_line), not {type(given).__name__}")
    preset = {} if given.get("data") else SHAPES_PRESET
    recipe = RECIPES.get(given.get("recipe"), {})
    model = given.get("model", recipe.get("model", preset.get("model")))
    preset, recipe = ({k: v for k, v in options.items() if options.get("model") == model or k not in MODEL_OPTIONS}
                      for options in (preset, recipe))
    return {**preset, **recipe}
