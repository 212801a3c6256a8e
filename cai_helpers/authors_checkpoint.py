"""Import the authors' published AstroMAE checkpoint without running code from the file.

The authors publish the fine-tuned model as a whole pickled ``torch.nn.DataParallel``
(``Mixed_Inception_z_VITAE_Base_Img_Full_New_Full.pt``) whose classes live in their
modules ``blocks.model_vit_inception`` (ViT_Astro), ``blocks.photoz`` (Input_Mix_Model)
and ``NormalCell`` plus ``torch.nn`` and timm 0.4.12. Plain ``torch.load`` would import
those modules and run whatever the pickle requests. Here ``torch.load`` gets a restricted
pickle module whose ``find_class``:

- allows torch's tensor and parameter rebuild functions, storage types, dtypes,
  ``torch.device``, ``torch.Size``, ``collections.OrderedDict`` and ``set``;
- maps class-like names (leading capital) from the known module paths to an inert stub
  that only records its constructor arguments and pickled ``__dict__``;
- raises UnsafePickleError naming the file and the global for everything else
  (``os.system``, ``builtins.exec``, ``subprocess.Popen``, ...).

The stub tree is then walked to a state dict (``_parameters``, persistent ``_buffers``,
``_modules``), the ``module.`` prefix of DataParallel is dropped and encoder names get our
``encoder.`` prefix. Run ``python -m cai_helpers.authors_checkpoint SRC.pt DST_FOLDER``
to convert a file into a safetensors model folder.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from cai_helpers.checkpoint import save_model
from cai_helpers.errors import CheckpointError, UnsafePickleError
from cai_helpers.model import AstroMAE, AstroMAEConfig

logger = logging.getLogger(__name__)

AUTHORS_MODULES = ("blocks.model_vit_inception", "blocks.photoz", "NormalCell")
STUB_MODULE_PREFIXES = ("torch.nn.", "timm.")
ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("torch", "device"),
    ("torch", "Size"),
}
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.")
# ours, absent from the authors' model: the identity input scaling they apply implicitly
IDENTITY_BUFFERS = ("pixel_scale", "mag_mean", "mag_std")


class ModuleStub:
    """Inert stand-in for a pickled class: stores arguments and state, runs nothing."""

    source = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub of {self.source}>"


_STUBS: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    source = f"{module}.{name}"
    if source not in _STUBS:
        _STUBS[source] = type(name, (ModuleStub,), {"source": source})
    return _STUBS[source]


def _is_stub_source(module: str, name: str) -> bool:
    known = module in AUTHORS_MODULES or module.startswith(STUB_MODULE_PREFIXES) \
        or module == "timm"
    return known and name.isidentifier() and name[:1].isupper()


def restricted_pickle_module(path: str | Path) -> types.ModuleType:
    """Build a pickle-compatible module for ``torch.load`` that allows only the globals
    listed in this module's docstring; errors name ``path``."""
    path = str(path)

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in ALLOWED_GLOBALS:
                if module == "__builtin__":
                    module = "builtins"
                return getattr(__import__(module, fromlist=[name]), name)
            if module == "torch" and (name.endswith("Storage") or
                                      isinstance(getattr(torch, name, None), torch.dtype)):
                return getattr(torch, name)
            if _is_stub_source(module, name):
                return _stub_class(module, name)
            raise UnsafePickleError(
                f"{path}: the pickle requests the global {module}.{name}, which is not on "
                "the allow-list of the authors' checkpoint format; the file was not loaded. "
                "Only load files from a trusted source, and convert them once with "
                "python -m cai_helpers.authors_checkpoint")

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    module = types.ModuleType("cai_restricted_pickle")
    module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


def _state_of(stub: ModuleStub) -> dict[str, Any]:
    state = stub.state
    if isinstance(state, tuple):  # (dict state, slot state)
        state = state[0]
    if not isinstance(state, dict):
        raise CheckpointError(f"pickled {stub.source} has no attribute dictionary; the file "
                              "does not hold torch modules")
    return state


def stub_state_dict(root: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Collect parameters and persistent buffers from a stub tree, as
    ``nn.Module.state_dict`` names them."""
    if isinstance(root, dict) and all(torch.is_tensor(v) for v in root.values()):
        return {prefix + k: v for k, v in root.items()}  # the file held a state dict
    if not isinstance(root, ModuleStub):
        raise CheckpointError(f"expected a pickled module, found {type(root).__name__}")

    state = _state_of(root)
    out: dict[str, torch.Tensor] = {}
    for name, param in (state.get("_parameters") or {}).items():
        if param is not None:
            out[prefix + name] = param.detach()
    skipped = state.get("_non_persistent_buffers_set") or set()
    for name, buffer in (state.get("_buffers") or {}).items():
        if buffer is not None and name not in skipped:
            out[prefix + name] = buffer
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(stub_state_dict(child, f"{prefix}{name}."))
    return out


def map_authors_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the authors' state-dict keys onto ours: drop ``module.``, prefix encoder keys.

    NOTE: names below ``inception_model.vis_inception`` are assumed to match ours, because
    the published description lists only the prefix. A file that differs there shows up
    as missing and unexpected keys.
    """
    mapped = {}
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith(ENCODER_PREFIXES):
            name = "encoder." + name
        mapped[name] = value
    return mapped


def read_authors_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Unpickle the authors' file with the restricted module and return its state dict
    under the authors' names."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"authors' checkpoint {path} not found")
    root = torch.load(path, map_location="cpu", weights_only=False,
                      pickle_module=restricted_pickle_module(path))
    return stub_state_dict(root)


def import_authors_checkpoint(path: str | Path, config: AstroMAEConfig | None = None,
                              strict: bool = True) -> tuple[AstroMAE, dict[str, list[str]]]:
    """Load the authors' pickled model into our AstroMAE.

    Returns the model (eval mode) and a report with ``missing`` and ``unexpected`` keys
    (our names) and ``mis_shaped`` entries. With ``strict`` any missing or mis-shaped
    tensor raises CheckpointError; unexpected keys are only logged.
    """
    model = AstroMAE(config)
    state = map_authors_names(read_authors_state_dict(path))
    expected = model.state_dict()
    for name in IDENTITY_BUFFERS:
        state.setdefault(name, expected[name].clone())

    report = {
        "missing": sorted(set(expected) - set(state)),
        "unexpected": sorted(set(state) - set(expected)),
        "mis_shaped": sorted(f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
                             for k in set(state) & set(expected)
                             if state[k].shape != expected[k].shape),
    }
    if report["unexpected"]:
        logger.warning("%s: ignoring %d unexpected tensors: %s", path,
                       len(report["unexpected"]), report["unexpected"])
    if strict and (report["missing"] or report["mis_shaped"]):
        raise CheckpointError(f"{path} does not match AstroMAE: missing {report['missing']}, "
                              f"mis-shaped {report['mis_shaped']}")
    usable = {k: v.to(expected[k].dtype) for k, v in state.items()
              if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(usable, strict=False)
    logger.info("imported %d tensors from %s", len(usable), path)
    return model.eval(), report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cai_helpers.authors_checkpoint",
        description="Convert the authors' pickled AstroMAE into a safetensors model folder.")
    parser.add_argument("source", help="the authors' .pt file")
    parser.add_argument("folder", help="output folder (model.safetensors + config.json)")
    parser.add_argument("--float32", action="store_true", help="keep float32 weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    model, report = import_authors_checkpoint(args.source)
    dtype = torch.float32 if args.float32 else torch.float16
    save_model(model, args.folder, dtype=dtype,
               extra={"source": Path(args.source).name, "import_report": report})


if __name__ == "__main__":
    main()
