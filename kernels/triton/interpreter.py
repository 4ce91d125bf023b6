"""Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``: CPU tensors, no GPU), read once.

``@triton.jit`` reads the variable when it decorates a kernel, so the value at the first import of the kernels
is the one that holds for the process.
"""

import importlib.util
import os

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _squeeze_scalar_index() -> bool:
    """Makes Triton's interpreter read a scalar argument's value as later Triton versions do.

    The interpreter holds a scalar kernel argument as a numpy array of shape (1,); Triton 3.6's reads its value
    (``range(0, K, BLOCK)``) with ``int(array)``, which numpy 2.5 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); later Triton squeezes the array first. Applied only to an interpreter that
    needs it; returns whether it did.
    """
    import inspect

    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if "int(self.handle.data)" not in inspect.getsource(original):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def prepare_interpreter() -> bool:
    """Applies the interpreter fixes this Triton needs (once; called where the kernels import Triton, so that
    ``import bayeslayers`` never imports it); returns whether a patch was applied."""
    global SCALAR_INDEX_PATCHED
    if SCALAR_INDEX_PATCHED is None:
        SCALAR_INDEX_PATCHED = INTERPRETING and TRITON_INSTALLED and _squeeze_scalar_index()
    return SCALAR_INDEX_PATCHED


SCALAR_INDEX_PATCHED = None  # set by prepare_interpreter()
