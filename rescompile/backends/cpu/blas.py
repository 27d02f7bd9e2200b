"""Row-major GEMM callable from inside ``@njit`` code, without allocation.

Design note
-----------
SciPy exports the Fortran BLAS it links (its own OpenBLAS copy) through
``scipy.linalg.cython_blas.__pyx_capi__``: one PyCapsule per routine, holding
the C address of ``sgemm``/``dgemm``.  We read those addresses once and
register them with LLVM under fixed symbol names (``llvmlite.binding.add_symbol``).
Generated kernels call the symbols by name, so the compiled code holds no
process-specific address and Numba's on-disk cache (``cache=True``) stays
valid in the next process: importing this module registers the symbols again
before any cached kernel is linked.  (A ctypes function pointer would bake the
address into the code and Numba disables caching for it.)

Fortran BLAS is column-major and takes every argument by pointer.  A row-major
``C = op(A) @ op(B)`` is the column-major ``C^T = op(B)^T @ op(A)^T``, so
``gemm`` swaps the operands (and m/n) and passes the same leading dimensions.
Scalars are stored in stack slots of the calling function's entry block
(``_addr_of``), so a call allocates nothing.

Threads: two OpenBLAS copies are loaded, NumPy's and SciPy's.  ``gemm`` calls
SciPy's.  ``set_blas_threads`` / ``blas_threads`` limit both (threadpoolctl).
The conv kernels assume ``set_blas_threads(1)`` (called once by whoever runs
them): kernels that call ``gemm`` inside ``prange`` would otherwise start
OpenBLAS threads from each worker and oversubscribe the cores.
"""

import contextlib
import ctypes

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

SGEMM_SYMBOL = "rescompile_blas_sgemm"
DGEMM_SYMBOL = "rescompile_blas_dgemm"

_TRANS_N = 78  # ord("N")
_TRANS_T = 84  # ord("T")


def _capsule_address(capsule):
    """Return the C pointer held by a PyCapsule as an int."""
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype = ctypes.c_char_p
    get_name.argtypes = [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return get_pointer(capsule, get_name(capsule))


def _register_symbols():
    from scipy.linalg import cython_blas

    capi = cython_blas.__pyx_capi__
    addresses = {
        SGEMM_SYMBOL: _capsule_address(capi["sgemm"]),
        DGEMM_SYMBOL: _capsule_address(capi["dgemm"]),
    }
    for name, address in addresses.items():
        llvm_binding.add_symbol(name, address)
    return addresses


GEMM_ADDRESSES = _register_symbols()

# ctypes types of the Fortran routines (for calls from plain Python).
_GEMM_ARGTYPES = [ctypes.c_void_p] * 13
_sgemm_ctypes = ctypes.CFUNCTYPE(None, *_GEMM_ARGTYPES)(GEMM_ADDRESSES[SGEMM_SYMBOL])
_dgemm_ctypes = ctypes.CFUNCTYPE(None, *_GEMM_ARGTYPES)(GEMM_ADDRESSES[DGEMM_SYMBOL])


# --- Numba intrinsics -------------------------------------------------------

@intrinsic
def _addr_of(typingctx, value):
    """Store ``value`` in an entry-block stack slot; return its address."""
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once_value(builder, args[0])
        return builder.bitcast(slot, cgutils.voidptr_t)
    return types.voidptr(value), codegen


@intrinsic
def _data_ptr(typingctx, array):
    """Address of the first element of an array (view) as ``void*``."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, signature, args):
        proxy = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.bitcast(proxy.data, cgutils.voidptr_t)
    return types.voidptr(array), codegen


def _make_call_intrinsic(symbol):
    @intrinsic
    def call(typingctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        sig = types.void(*([types.voidptr] * 13))

        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t] * 13)
            fn = cgutils.get_or_insert_function(builder.module, fnty, symbol)
            builder.call(fn, args)
            return context.get_dummy_value()
        return sig, codegen
    return call


_sgemm_call = _make_call_intrinsic(SGEMM_SYMBOL)
_dgemm_call = _make_call_intrinsic(DGEMM_SYMBOL)


# --- the public GEMM ----------------------------------------------------------

def gemm(transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
    """Row-major ``C[:m, :n] = alpha * op(A) @ op(B) + beta * C``.

    ``A``, ``B``, ``C`` are arrays (any rank, usually 1-D flat views); only
    their data pointer is used, so pass a sub-view (``buf[off:]``) for an
    offset.  ``op(A)`` is m×k (A stored k×m when ``transa``), ``op(B)`` is
    k×n; ``lda``/``ldb``/``ldc`` are row strides in elements.  All three must
    share one dtype, float32 or float64.  Nothing is checked: this is the raw
    BLAS contract.  Callable from Python (through ctypes) and from ``@njit``.
    """
    if not (A.dtype == B.dtype == C.dtype):
        raise TypeError("gemm: A, B and C must share one dtype")
    if C.dtype == np.float32:
        fn, scalar = _sgemm_ctypes, ctypes.c_float
    elif C.dtype == np.float64:
        fn, scalar = _dgemm_ctypes, ctypes.c_double
    else:
        raise TypeError(f"gemm: unsupported dtype {C.dtype}")

    def ref(obj):
        return ctypes.cast(ctypes.pointer(obj), ctypes.c_void_p)

    fn(ref(ctypes.c_char(_TRANS_T if transb else _TRANS_N)),
       ref(ctypes.c_char(_TRANS_T if transa else _TRANS_N)),
       ref(ctypes.c_int(n)), ref(ctypes.c_int(m)), ref(ctypes.c_int(k)),
       ref(scalar(alpha)), B.ctypes.data, ref(ctypes.c_int(ldb)),
       A.ctypes.data, ref(ctypes.c_int(lda)),
       ref(scalar(beta)), C.ctypes.data, ref(ctypes.c_int(ldc)))


@overload(gemm, jit_options={"nogil": True})
def _gemm_overload(transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
    if not all(isinstance(t, types.Array) for t in (A, B, C)):
        return None
    if not (A.dtype == B.dtype == C.dtype):
        return None
    if C.dtype == types.float32:
        call, scalar = _sgemm_call, np.float32
    elif C.dtype == types.float64:
        call, scalar = _dgemm_call, np.float64
    else:
        return None

    def impl(transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        ta = np.uint8(_TRANS_T) if transa else np.uint8(_TRANS_N)
        tb = np.uint8(_TRANS_T) if transb else np.uint8(_TRANS_N)
        # Column-major view: C^T (n x m) = op(B)^T (n x k) @ op(A)^T (k x m).
        call(_addr_of(tb), _addr_of(ta),
             _addr_of(np.int32(n)), _addr_of(np.int32(m)), _addr_of(np.int32(k)),
             _addr_of(scalar(alpha)), _data_ptr(B), _addr_of(np.int32(ldb)),
             _data_ptr(A), _addr_of(np.int32(lda)),
             _addr_of(scalar(beta)), _data_ptr(C), _addr_of(np.int32(ldc)))
    return impl


@njit(nogil=True, cache=True)
def gemm_njit(transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
    """``gemm`` compiled; for tests and for calls from Python at njit speed."""
    gemm(transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)


# --- BLAS thread control --------------------------------------------------------

_controller = None


def _blas_controllers():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController
        _controller = ThreadpoolController()
    return [lib for lib in _controller.lib_controllers if lib.user_api == "blas"]


def get_blas_threads():
    """Thread count of every loaded BLAS library (NumPy's and SciPy's)."""
    return {lib.filepath: lib.num_threads for lib in _blas_controllers()}


def set_blas_threads(n):
    """Set the thread count of every loaded BLAS; return the previous counts.

    Cheap (a direct ``openblas_set_num_threads`` per library, the library list
    is scanned once per process), so it may wrap each kernel call.
    """
    previous = {}
    for lib in _blas_controllers():
        previous[lib.filepath] = lib.num_threads
        lib.set_num_threads(n)
    return previous


@contextlib.contextmanager
def blas_threads(n):
    """``with blas_threads(1): kernel(...)`` — limit every BLAS copy, then restore."""
    previous = set_blas_threads(n)
    try:
        yield
    finally:
        for lib in _blas_controllers():
            lib.set_num_threads(previous.get(lib.filepath, lib.num_threads))


def blas_info():
    """One line per loaded BLAS: file, core type, threads (for benchmark reports)."""
    return [f"{lib.filepath.rsplit('/', 1)[-1]} arch={lib.architecture} "
            f"version={lib.version} threads={lib.num_threads}"
            for lib in _blas_controllers()]
