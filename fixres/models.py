"""Model factory: timm models by name, torchvision ones as `tv:<name>`.

    create_model("resnet50", num_classes=5)                  # timm, random init
    create_model("tv:resnet50", num_classes=5, weights="r50.pth")
    create_model("resnet50", num_classes=5, pretrained=True)  # needs the network
    create_model("test_vit", num_classes=5, model_kwargs={"patch_size": 8, "img_size": 64})  # --model-kwargs

timm's and torchvision's ResNets use the same parameter names (conv1, layer4,
fc), so a state dict from either loads into both.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from torch import nn

from fixres.checkpoint import RunFolder
from fixres.config import ConfigError
from fixres.data import DataError
from fixres.fileio import load_weights, refused_pickle
from fixres.runtime import error_reason
from fixres.transforms import INTERPOLATIONS


class ModelError(ValueError):
    """Unknown model, unreachable pretrained weights, or weights that do not fit."""


TV_PREFIX = "tv:"


def create_model(name: str, num_classes: int, *, pretrained: bool = False, weights: str | Path | None = None,
                 output_stride: int | None = None, model_kwargs: dict | None = None) -> nn.Module:
    model = _build(name, num_classes, pretrained, output_stride, model_kwargs)
    if weights:
        load_weights_into(model, read_state_dict(weights), source=str(weights))
    return model


def check_model_name(name: str) -> None:
    """Fail fast, before any data is read, on a name neither library knows."""
    if name.startswith(TV_PREFIX):
        import torchvision
        if name[len(TV_PREFIX):] not in torchvision.models.list_models():
            raise ModelError(f"--model {name}: unknown torchvision model")
    else:
        import timm
        if not timm.is_model(name):
            raise ModelError(f"--model {name}: unknown timm model (torchvision models are named tv:<name>)")


def check_model_kwargs(name: str, model_kwargs: dict | None) -> None:
    """Fail fast, before any data is read, on --model-kwargs the constructor does not take: the
    model is built on the meta device (no memory, no initialisation), where a keyword it does
    not take stops the call as it would on the CPU. A constructor that computes with its
    tensors cannot be built there: then it is built for real, once."""
    if not model_kwargs:
        return
    check_model_name(name)
    try:
        with torch.device("meta"):
            _construct(name, 2, False, model_kwargs)
    except TypeError as err:
        raise model_kwargs_error(name, model_kwargs, err) from None
    except Exception:
        try:
            _construct(name, 2, False, model_kwargs)
        except Exception as err:
            raise model_kwargs_error(name, model_kwargs, err) from None


def model_kwargs_error(name: str, model_kwargs: dict, err: Exception) -> ConfigError:
    """One line for a constructor that refused --model-kwargs: the keyword it does not take
    (or that its builder passes itself), else the values and the constructor's reason."""
    text = str(err)
    owner = re.match(r"(\w+)\.__init__\(\)", text)
    library = "torchvision" if name.startswith(TV_PREFIX) else "timm"
    model = f"{name} ({library}'s {owner.group(1)})" if owner else name
    for key in model_kwargs:
        if f"'{key}'" in text and "unexpected keyword" in text:
            return ConfigError(f"--model-kwargs {key}: {model} takes no keyword {key}")
        if f"'{key}'" in text and "multiple values" in text:
            return ConfigError(f"--model-kwargs {key}: {name}'s builder passes it itself")
    pairs = " ".join(f"{k}={v!r}" for k, v in model_kwargs.items())
    return ConfigError(f"--model-kwargs {pairs}: {name} cannot be built with them ({error_reason(err)})")


def _meta_model(name: str, model_kwargs: dict | None) -> nn.Module:
    """The model built on the meta device (no memory, no initialisation) to read its structure;
    a constructor that computes with its tensors cannot be built there: then for real."""
    try:
        with torch.device("meta"):
            return _construct(name, 2, False, model_kwargs or {})
    except Exception:
        return _construct(name, 2, False, model_kwargs or {})


def constructor_keywords(name: str, model_kwargs: dict | None = None) -> set[str]:
    """The keywords the model's class takes (timm's and torchvision's builders pass **kwargs on
    to it; torchvision's also pass some themselves: a ViT's patch_size)."""
    keywords = set()
    # a class that passes **kwargs on to its base (a distilled DeiT's): the base's keywords too
    for cls in type(_meta_model(name, model_kwargs)).__mro__:
        params = inspect.signature(cls).parameters
        keywords |= set(params)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()) or cls is nn.Module:
            return keywords
    return keywords


SIZE_KEYWORDS = ("img_size", "image_size")  # timm's, torchvision's ViT's


def size_keyword(name: str, model_kwargs: dict | None = None) -> str | None:
    """The constructor keyword that builds the model for one input size, else None (CNNs)."""
    keywords = constructor_keywords(name, model_kwargs)
    return next((key for key in SIZE_KEYWORDS if key in keywords), None)


def recorded_size_keyword(model_kwargs: dict | None) -> str | None:
    """The size keyword a run's --model-kwargs record (train.py put it there), else None."""
    return next((key for key in SIZE_KEYWORDS if key in (model_kwargs or {})), None)


def check_model_sizes(name: str, model_kwargs: dict | None, sizes: dict[str, int]) -> None:
    """Fail fast on an --option's size the model cannot run at (a ViT: not a multiple of its patch)."""
    # built at its default size: torchvision's ViT cannot even be built at a size off its patch grid
    model = _meta_model(name, {k: v for k, v in (model_kwargs or {}).items() if k not in SIZE_KEYWORDS})
    for option, size in sizes.items():
        if why_not := size_refusal(model, name, size):
            raise ConfigError(f"{option} {size}: {why_not}")


def nearest_size_it_takes(name: str, model_kwargs: dict | None, size: int) -> int:
    """`size`, or the nearest size the model can run at (a ViT: a multiple of its patch; ties up)."""
    patch = patch_size(_meta_model(name, {k: v for k, v in (model_kwargs or {}).items() if k not in SIZE_KEYWORDS}))
    return size if patch is None else max(patch, patch * round(size / patch + 1e-9))


def sized_model_kwargs(name: str, train_res: int, model_kwargs: dict | None) -> dict | None:
    """train.py's --model-kwargs with img_size=train_res for a model whose constructor takes it
    (image_size for torchvision's ViT: a ViT or a Swin is built for one size and refuses any
    other), unless given; recorded in the run's config and weights so that every rebuild
    (sweep, finetune, export) is the network that was trained."""
    key = size_keyword(name, model_kwargs)
    if key is None or recorded_size_keyword(model_kwargs):
        return model_kwargs
    return {**(model_kwargs or {}), key: train_res}


def any_size_kwargs(name: str, model_kwargs: dict | None) -> dict | None:
    """The recorded --model-kwargs plus dynamic_img_size=True where the constructor takes it:
    the same parameters, and a forward pass at any size resamples a ViT's position embedding
    from the trained grid with timm's resample_abs_pos_embed (bicubic, antialiased), as timm's
    checkpoint filter does for weights loaded into a model built at another size; a Swin keeps
    its trained windows and pads to them, with the attention masks of that size. One model then
    serves every size of a sweep (each batch runs at all of them), and is the network timm
    builds from the export (its model_args say dynamic_img_size), so the export's outputs at
    its test size are the sweep's."""
    if not (model_kwargs and "img_size" in model_kwargs) or "dynamic_img_size" in model_kwargs:
        return model_kwargs
    if "dynamic_img_size" not in constructor_keywords(name, model_kwargs):
        return model_kwargs
    return {**model_kwargs, "dynamic_img_size": True}


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
    themselves: dynamic_img_size (any_size_kwargs)."""
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


def _build(name: str, num_classes: int, pretrained: bool, output_stride: int | None = None,
           model_kwargs: dict | None = None) -> nn.Module:
    check_model_name(name)
    if output_stride and name.startswith(TV_PREFIX):
        raise ModelError(f"--output-stride is for timm models; {name} is torchvision's")
    extra = {"output_stride": output_stride} if output_stride else {}
    try:  # at any size it can take: a torchvision ViT as torchvision builds it there
        return serve_any_size(_construct(name, num_classes, pretrained, {**extra, **(model_kwargs or {})}))
    except ModelError:
        raise
    except TypeError as err:
        if output_stride and "output_stride" in str(err):
            raise ModelError(f"--output-stride {output_stride}: timm's {name} does not take it") from None
        if model_kwargs and not pretrained:
            raise model_kwargs_error(name, model_kwargs, err) from None
        raise
    except Exception as err:  # hub/HTTP/file errors come in many types
        if pretrained:
            raise ModelError(f"--pretrained: cannot get pretrained weights for {name} ({error_reason(err)}); "
                             f"download them elsewhere and pass --weights FILE") from None
        if model_kwargs:
            raise model_kwargs_error(name, model_kwargs, err) from None
        raise


def _construct(name: str, num_classes: int, pretrained: bool, kwargs: dict) -> nn.Module:
    """The library's model; `kwargs` go to its constructor (timm's builders let them override
    their own defaults: test_resnet's stem_width)."""
    if name.startswith(TV_PREFIX):
        import torchvision
        tv_name = name[len(TV_PREFIX):]
        if not pretrained:
            return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
        model = torchvision.models.get_model(tv_name, weights="DEFAULT", **kwargs)
        return _resize_classifier(model, num_classes)
    import timm
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


# what fixres's transforms can reproduce of a library's preprocessing
PREPROCESSING_KEYS = ("mean", "std", "interpolation", "crop_pct")


def pretrained_preprocessing(name: str) -> dict:
    """The preprocessing the library's pretrained weights of `name` were made with: mean,
    std, interpolation and crop_pct from timm's pretrained_cfg (the tag's, e.g.
    "resnet50.a1_in1k", else the default tag's) or from torchvision's DEFAULT weights'
    transforms (crop_pct = crop / resize: 224 / 232 for ResNet-50 V2). Read from the
    libraries' registries: nothing is downloaded. Keys it cannot give are left out."""
    check_model_name(name)
    if name.startswith(TV_PREFIX):
        import torchvision
        try:
            weights = torchvision.models.get_model_weights(name[len(TV_PREFIX):]).DEFAULT
        except (ValueError, AttributeError):  # a model without pretrained weights
            return {}
        preset = weights.transforms()
        found = {"mean": list(preset.mean), "std": list(preset.std), "interpolation": preset.interpolation.value,
                 "crop_pct": preset.crop_size[0] / preset.resize_size[0]}
    else:
        import timm
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            return {}
        found = {"mean": list(cfg.mean), "std": list(cfg.std), "interpolation": cfg.interpolation,
                 "crop_pct": cfg.crop_pct}
        if cfg.crop_mode not in (None, "center"):  # squash / border crops: not ours; keep our crop_pct
            del found["crop_pct"]
    if found.get("interpolation") not in INTERPOLATIONS:
        found.pop("interpolation", None)
    return found


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the final Linear layer (timm knows it; for others, the last Linear)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier")
    if isinstance(name, str) and isinstance(_get(model, name), nn.Linear):
        return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no Linear classifier")
    return linears[-1]


def classifier_names(model: nn.Module) -> list[str]:
    """Every classifier's dotted name: a distilled DeiT has two (timm's pretrained_cfg lists head
    and head_dist; its forward averages their logits), other models the one classifier_name gives."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, (tuple, list)) and names and all(isinstance(_get(model, n), nn.Linear) for n in names):
        return list(names)
    return [classifier_name(model)]


def _get(model: nn.Module, dotted: str):
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        return None


def _resize_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    name = classifier_name(model)
    old = model.get_submodule(name)
    if old.out_features != num_classes:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Linear(old.in_features, num_classes))
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth/.pt/.bin read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = refused_pickle(err) or error_reason(err)
        raise ModelError(f"{path}: cannot read weights ({reason})") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    # DDP and torch.compile prefixes
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                      replace_classifier: bool = True) -> list[str]:
    """Load `state`; a classifier of another class count is left freshly initialised.
    Returns the keys that were not loaded. Anything else that does not fit is an error."""
    own = model.state_dict()
    head = tuple(name + "." for name in classifier_names(model))
    skipped = []
    usable = {}
    for key, value in state.items():
        if key not in own:
            continue
        if own[key].shape != value.shape:
            value = _resampled(model, key, value)  # weights made at another size
        if own[key].shape != value.shape:
            if replace_classifier and key.startswith(head):
                skipped.append(key)
                continue
            raise ModelError(f"{source}: {key} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
        usable[key] = value
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in usable and k not in skipped
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelError(f"{source}: does not match the model: {len(missing)} missing key(s), "
                         f"e.g. {missing[0]}" + (f"; unexpected e.g. {unexpected[0]}" if unexpected else ""))
    if unexpected:  # dropping them silently evaluates another model than the file's (a lost adapter)
        from fixres.adapt import ADAPTER
        hint = (" (a parametric run's adapter: load the run with --checkpoint, which restores it)"
                if unexpected[0].startswith(ADAPTER + ".") else "")
        raise ModelError(f"{source}: holds {len(unexpected)} key(s) the model lacks, e.g. {unexpected[0]}{hint}")
    model.load_state_dict(usable, strict=False)
    return skipped


def _resampled(model: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
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


def load_run_model(path: str | Path, which: str = "best") -> tuple[nn.Module, dict]:
    """A classifier from a run folder (its `which` weights), a checkpoint folder or a
    .safetensors file written by fixres, with the preprocessing metadata it carries, and
    the parametric adapter when the weights hold one (so it is evaluated as it was made)."""
    from fixres.adapt import attach_saved_adapter  # adapt imports this module
    weights_path = RunFolder.find_weights(Path(path), which)
    state, meta = load_weights(weights_path)
    if not meta.get("model") or not meta.get("classes"):
        raise ModelError(f"{weights_path}: no fixres metadata (model name, classes); "
                         f"pass plain weights with --weights and --model instead")
    # at any size: the recorded network, its position embedding resampled for the input's size
    model = _build(meta["model"], len(meta["classes"]), pretrained=False, output_stride=meta.get("output_stride"),
                   model_kwargs=any_size_kwargs(meta["model"], meta.get("model_kwargs")))
    attach_saved_adapter(model, state)  # first: its keys are then the model's own
    load_weights_into(model, state, source=str(weights_path), replace_classifier=False)
    return model, {**meta, "weights_path": str(weights_path)}


def load_plain_weights(name: str, path: str | Path, classes: list[str], *, data: str) -> nn.Module:
    """Model `name` with a plain state dict (no fixres metadata) for the `classes` of `data`;
    a classifier of another size is refused, not replaced (these weights are to be evaluated)."""
    state = read_state_dict(path)
    model = create_model(name, len(classes))
    head = state.get(classifier_name(model) + ".weight")
    if head is not None and head.shape[0] != len(classes):
        raise DataError(f"{data}: {len(classes)} classes, but --weights {path} has a {head.shape[0]}-class classifier")
    load_weights_into(model, state, source=str(path), replace_classifier=False)
    return model
