"""Model factory: timm models by name, torchvision ones as `tv:<name>`.

    create_model("resnet50", num_classes=5)                  # timm, random init
    create_model("tv:resnet50", num_classes=5, weights="r50.pth")
    create_model("resnet50", num_classes=5, pretrained=True)  # needs the network
    create_model("test_vit", num_classes=5, model_kwargs={"patch_size": 8, "img_size": 64})  # --model-kwargs

timm's and torchvision's ResNets use the same parameter names (conv1, layer4,
fc), so a state dict from either loads into both.

Also here, by model name: the checks train.py makes before it reads any data (check_model_name,
check_model_kwargs, check_model_sizes), the constructor keyword that builds a ViT or a Swin for
one size and the --model-kwargs a run records with it (sized_model_kwargs, any_size_kwargs), the
preprocessing of a library's pretrained weights; and reading a state dict and loading it into a
built model (read_state_dict, load_weights_into). What a built model's size is and how it is
resized: fixres/model_sizes.py; its classifiers and ModelError: fixres/classifiers.py; a trained
run's model, rebuilt from its weights' metadata: fixres/trained_model.py.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from torch import nn

from fixres.adapter import ADAPTER
from fixres.classifiers import ModelError, classifier_name, classifier_names
from fixres.config import ConfigError
from fixres.fileio import refused_pickle
from fixres.model_sizes import patch_size, serve_any_size, size_refusal, weight_at_model_size
from fixres.runtime import error_reason
from fixres.transforms import INTERPOLATIONS


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


_META_MODELS: dict[tuple[str, str], nn.Module] = {}  # (name, its kwargs' repr) -> the meta model, read only
_META_MODELS_KEPT = 32


def _meta_model(name: str, model_kwargs: dict | None) -> nn.Module:
    """The model built on the meta device (no memory, no initialisation) to read its structure,
    once per name and kwargs in a process (a run's checks read it several times: 30-50 ms a
    build); a constructor that computes with its tensors cannot be built there: then for real,
    and not kept (it holds memory)."""
    key = (name, repr(sorted((model_kwargs or {}).items())))
    if key in _META_MODELS:
        return _META_MODELS[key]
    try:
        with torch.device("meta"):
            model = _construct(name, 2, False, model_kwargs or {})
    except Exception:
        return _construct(name, 2, False, model_kwargs or {})
    if len(_META_MODELS) >= _META_MODELS_KEPT:
        del _META_MODELS[next(iter(_META_MODELS))]  # the oldest
    _META_MODELS[key] = model
    return model


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
            value = weight_at_model_size(model, key, value)  # weights made at another size
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
        hint = (" (a parametric run's adapter: load the run with --checkpoint, which restores it)"
                if unexpected[0].startswith(ADAPTER + ".") else "")
        raise ModelError(f"{source}: holds {len(unexpected)} key(s) the model lacks, e.g. {unexpected[0]}{hint}")
    model.load_state_dict(usable, strict=False)
    return skipped
