"""Small members of torchvision's ViT, ConvNeXt and Swin families, registered in torchvision's own
model registry, so that `--model tv:small_vit_b_16` (and tv:small_convnext, tv:small_swin) runs
through every path a torchvision model takes: torchvision.models.get_model, list_models, and
get_model_weights (for the default preprocessing), as tv:vit_b_16, tv:convnext_tiny and tv:swin_t do.

torchvision's own builders pass their widths and depths themselves (--model-kwargs cannot make
vit_b_16 smaller), and at full width one end-to-end run of the family matrix took 15-40 s of this
machine's CPU per family. These are the same classes with the same patch, windows, head and
last normalisation layer, one or two blocks a stage, a few channels wide:

    from tests.small_torchvision import register; register()   # idempotent; in each process that builds them
"""
from typing import Optional

import torchvision
from torchvision.models import ConvNeXt_Tiny_Weights, Swin_T_Weights, ViT_B_16_Weights
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

# The `weights` annotations name the full-size model's weights: torchvision's get_model_weights reads
# them, and fixres takes a torchvision model's default preprocessing from those weights' transforms.


def small_vit_b_16(*, weights: Optional[ViT_B_16_Weights] = None, progress: bool = True, **kwargs) -> VisionTransformer:
    """vit_b_16's class and 16 px patch, 1 layer of width 32 (86M -> 34k parameters)."""
    assert weights is None, "no weights for a small test model"
    return VisionTransformer(**{"image_size": 224, **kwargs}, patch_size=16, num_layers=1, num_heads=2,
                             hidden_dim=32, mlp_dim=64)


def small_convnext(*, weights: Optional[ConvNeXt_Tiny_Weights] = None, progress: bool = True, **kwargs) -> ConvNeXt:
    """convnext_tiny's class and 4 stages, 1 block of 8-64 channels a stage (28M -> 62k parameters)."""
    assert weights is None, "no weights for a small test model"
    stages = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)]
    return ConvNeXt(stages, stochastic_depth_prob=0.1, **kwargs)


def small_swin(*, weights: Optional[Swin_T_Weights] = None, progress: bool = True, **kwargs) -> SwinTransformer:
    """swin_t's class, 4 px patch and 7 px windows, 2 blocks a stage (so the second one's windows
    are shifted, as in swin_t), width 16-128 (28M -> 0.6M parameters)."""
    assert weights is None, "no weights for a small test model"
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                           window_size=[7, 7], stochastic_depth_prob=0.2, **kwargs)


def register() -> None:
    from torchvision.models._api import register_model  # torchvision's decorator for its own builders
    for builder in (small_vit_b_16, small_convnext, small_swin):
        if builder.__name__ not in torchvision.models.list_models():
            register_model()(builder)
