"""Make a CUDA-built torchvision importable beside a CPU-only torch.

PyPI serves torchvision 0.28.0 only as a CUDA build. Beside the CPU torch its compiled
extension does not load, and ``import torchvision`` then fails while registering fake
kernels for ``torchvision::nms`` / ``torchvision::qnms`` ("operator does not exist").
timm, torch-fidelity, diffusers and the ``accelerate`` CLI all import torchvision.

Declaring the two operator schemas first lets the import succeed; torchvision's compiled
ops (``ops.nms``, ``io.decode_*``) stay unavailable, and the project uses PIL for image I/O.
A meta-path hook installed at start-up by a one-line ``.pth`` file that ``.ci/install``
writes only on machines where the extension fails to load (never on a GPU machine with
matching wheels) runs it right before torchvision's first import, so start-up costs nothing.
"""


def _declare_missing_torchvision_ops() -> None:
    import glob
    import importlib.util
    import os

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = []
    for loc in spec.submodule_search_locations:
        libs += glob.glob(os.path.join(loc, "_C*.so"))
    if not libs:
        return
    import torch

    try:
        torch.ops.load_library(libs[0])
        return  # the real extension works: nothing to do
    except OSError:
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_torchvision_lib"] = lib  # keep the Library object alive


class _BeforeTorchvision:
    """Meta-path hook: runs the declaration once, right before torchvision is first imported."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchvision":
            import sys

            sys.meta_path.remove(cls)
            try:
                _declare_missing_torchvision_ops()
            except Exception:  # never break the import that triggered us
                pass
        return None  # let the normal finders import the module


def install() -> None:
    import sys

    if _BeforeTorchvision not in sys.meta_path:
        sys.meta_path.insert(0, _BeforeTorchvision)


install()
