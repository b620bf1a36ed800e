"""The input sizes a built model takes, and the network its library builds at another size.

A ViT or a Swin is built for one input size: its position embedding or its windows are that
size's. These functions read and change that on a built model (nothing here builds one):

    patch_size(model), patch_grid(model)       # 16, (14, 14) for a ViT-B/16 at 224; None for a CNN
    size_refusal(model, name, 200)             # why it cannot run at 200 px, else None
    sizes_it_takes(model, name, sizes)         # the sizes it can run at, and a line on the others
    resize_model(model, 384)                   # in place: the network its library builds at 384
    serve_any_size(model)                      # a torchvision ViT that runs at any size it takes
    weight_at_model_size(model, key, tensor)   # weights made at another size, resampled as on loading

fixres.models builds models (its size keywords choose the size a model is built for) and loads
weights through weight_at_model_size; fixres.adapt finds a ViT's position embedding by its grid.
"""
from __future__ import annotations

import torch
from torch import nn


def patch_size(model: nn.Module) -> int | None:
    """The patch a ViT's or a timm Swin's input sides must be multiples of (timm's PatchEmbed
    asserts it unless built with dynamic_img_pad, torchvision's ViT always), else None: the
    model takes any size (torchvision's Swin pads to its patch and windows). A hybrid ViT's
    patches are cut from its CNN stem's maps: its patch in pixels is the stem's stride times
    the patch (timm's HybridEmbed floors other sizes, dropping the border)."""
    if _is_tv_vit(model):
        return model.patch_size
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None or getattr(embed, "dynamic_img_pad", False):
        return None
    stride = max(getattr(embed, "feature_ratio", None) or (1,))  # HybridEmbed: the stem's stride
    return stride * (max(size) if isinstance(size, (tuple, list)) else int(size))


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """The (rows, columns) of patches a ViT or a timm Swin cuts from an image of the size it is
    built for (its tokens, less any class token), else None (CNNs)."""
    if _is_tv_vit(model):
        side = model.image_size // model.patch_size
        return side, side
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def size_refusal(model: nn.Module, name: str, size: int) -> str | None:
    """Why `model` cannot run at `size` px (its patch does not divide it), else None."""
    patch = patch_size(model)
    if patch is None or size % patch == 0:
        return None
    below = max(patch, size // patch * patch)
    return f"{name} takes multiples of its {patch} px patch (nearest: {below}, {below + patch})"


def sizes_it_takes(model: nn.Module, name: str, sizes: list[int]) -> tuple[list[int], str | None]:
    """(the sizes `model` can run at, one line naming the dropped ones and why, or None)."""
    dropped = [s for s in sizes if size_refusal(model, name, s)]
    if not dropped:
        return list(sizes), None
    kept = [s for s in sizes if s not in dropped]
    return kept, (f"dropped {', '.join(map(str, dropped))} px: {name} takes multiples of its "
                  f"{patch_size(model)} px patch")


def resize_model(model: nn.Module, size: int | tuple[int, int]) -> bool:
    """Make `model` (in place) the network its library builds for `size` px from these weights;
    False for a model that has no such size (CNNs). A timm ViT: set_input_size, its position
    embedding resampled once. A timm Swin: the windows its constructor gives at that size (its
    window_size, cut to each stage's grid), the relative-position tables resized from these
    as timm's checkpoint filter resizes them (set_input_size alone would scale the windows with
    the grid: not the network create_model(img_size=size) builds). torchvision's ViT: image_size,
    encoder.pos_embedding resampled by torchvision's interpolate_embeddings."""
    height, width = (size, size) if isinstance(size, int) else size
    if _is_tv_vit(model):
        from torchvision.models.vision_transformer import interpolate_embeddings
        old = model.encoder.pos_embedding
        with torch.no_grad():
            new = interpolate_embeddings(height, model.patch_size, {"encoder.pos_embedding": old})
        model.encoder.pos_embedding = nn.Parameter(new["encoder.pos_embedding"], requires_grad=old.requires_grad)
        model.image_size, model.seq_length = height, new["encoder.pos_embedding"].shape[1]
        return True
    if not hasattr(model, "set_input_size") or getattr(model, "patch_embed", None) is None:
        return False
    if _is_timm_swin(model):
        model.set_input_size(img_size=(height, width), window_size=model._ref_window_sizes)
    else:
        model.set_input_size(img_size=(height, width))
    return True


def _is_tv_vit(model: nn.Module) -> bool:
    return type(model).__name__ == "VisionTransformer" and hasattr(model, "conv_proj")  # timm's has patch_embed


def _is_timm_swin(model: nn.Module) -> bool:
    return type(model).__module__ == "timm.models.swin_transformer" and hasattr(model, "_ref_window_sizes")


def serve_any_size(model: nn.Module) -> nn.Module:
    """A torchvision ViT (built for one image_size) that runs at any size it can take: a forward
    at another size runs the network torchvision builds at that size from these weights
    (resize_model), made from the trained weights each time and undone after, so the parameters,
    the state dict and the trained size stay as they are (one model serves every size of a sweep
    batch; train.py trains it after --test-res evaluations). timm's ViT and Swin do this
    themselves: dynamic_img_size (fixres.models.any_size_kwargs)."""
    if _is_tv_vit(model):
        model.register_forward_pre_hook(_at_input_size)
        model.register_forward_hook(_back_at_built_size, always_call=True)
    return model


def _at_input_size(model: nn.Module, args) -> None:
    size = tuple(args[0].shape[-2:])
    if size == (model.image_size, model.image_size):
        return
    undo = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    resize_model(model, size)
    model._fixres_undo = undo


def _back_at_built_size(model: nn.Module, args, output) -> None:
    """Every module's attributes, parameters and buffers as they were (resize_model only
    reassigns them): not rebuilt, which inside inference mode would make inference tensors."""
    for module, attributes, parameters, buffers in model.__dict__.pop("_fixres_undo", ()):
        for key in set(module.__dict__) - set(attributes):
            del module.__dict__[key]
        module.__dict__.update(attributes)
        for store, saved in ((module._parameters, parameters), (module._buffers, buffers)):
            store.clear()
            store.update(saved)


def weight_at_model_size(model: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    """A tensor of weights made at another size that the model holds at its own size, as its
    library resamples it when it loads them: a timm ViT's pos_embed and a timm Swin's
    relative_position_bias_table as timm's checkpoint filters do, torchvision's ViT's
    encoder.pos_embedding as its interpolate_embeddings does. Anything else: unchanged."""
    if key == "encoder.pos_embedding" and _is_tv_vit(model) and value.dim() == 3:
        from torchvision.models.vision_transformer import interpolate_embeddings
        return interpolate_embeddings(model.image_size, model.patch_size, {key: value})[key]
    if key.endswith(".relative_position_bias_table") and _is_timm_swin(model):
        from timm.layers import resize_rel_pos_bias_table
        attn = model.get_submodule(key.rpartition(".")[0])
        return resize_rel_pos_bias_table(value, new_window_size=attn.window_size,
                                         new_bias_shape=attn.relative_position_bias_table.shape)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if key != "pos_embed" or grid is None or value.dim() != 3:
        return value
    from timm.layers import resample_abs_pos_embed
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    return resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix)
