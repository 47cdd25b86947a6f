"""Stand-in for ``detectron2._C``, installed by GMMSeg-D2 when detectron2 is built without its C++/CUDA ops.

detectron2 imports ``detectron2._C`` at module level (``detectron2.layers`` needs it for deformable
convolution and rotated boxes), so the package cannot even be imported when the compiled extension is
absent. Semantic segmentation uses none of those ops. This module lets the import succeed and makes every
compiled op fail loudly, naming the op, the moment it is called.
"""

from typing import Any, Callable, NoReturn

IS_STANDIN = True

_WHY = (
    "detectron2 was installed from source without its compiled C++/CUDA extension (detectron2._C is the "
    "GMMSeg-D2 stand-in), so the op {op!r} is unavailable. Semantic segmentation does not need it. To use "
    "ops such as deformable convolution, rotated boxes or the fast COCO evaluator, install a detectron2 "
    "build with compiled ops (see the README section 'Using your own detectron2 or torch') and re-run "
    "tools/install.py."
)


def get_compiler_version() -> str:
    return "none (detectron2._C stand-in: compiled ops not built)"


def get_cuda_version() -> str:
    return "none (detectron2._C stand-in: compiled ops not built)"


def has_cuda() -> bool:
    return False


def _missing_op(name: str) -> Callable[..., NoReturn]:
    def op(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(_WHY.format(op=name))

    op.__name__ = name
    op.__qualname__ = name
    return op


def __getattr__(name: str) -> Callable[..., NoReturn]:
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing_op(name)
