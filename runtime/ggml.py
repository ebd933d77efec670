"""The few ggml functions the llama.cpp lens needs, bound with ctypes.

llama-cpp-python binds llama.h but not ggml.h. Its bundled `libggml-base` and `libggml-cpu`
export what we need: reading a graph node while llama.cpp evaluates it (`TensorView`),
multiplying activations by a quantized matrix exactly the way llama.cpp's CPU matmul does
(`QuantizedMatrix`), without dequantizing the matrix, and reading a GGUF header with
llama.cpp's own parser (`GGUFHeader`: milliseconds, where the `gguf` package's reader takes
seconds to build Python objects for a 262k-entry vocabulary).

The struct layouts mirror the `include/ggml.h` installed with llama-cpp-python (pinned in
requirements.txt); `_check_abi` refuses to run if the library disagrees.
"""

from __future__ import annotations

import ctypes
import math
import pathlib
import threading
from dataclasses import dataclass

import numpy as np

from tracing.errors import UnsupportedModel

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_I32 = 26
# ggml types `TensorView.array` reads, as numpy dtypes (float nodes, and int32 ones such as the
# expert ids of a mixture-of-experts layer).
_NUMPY_TYPES = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_I32: np.int32}


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` from ggml.h."""


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]
TensorP = ctypes.POINTER(GGMLTensor)
NAME_OFFSET = GGMLTensor.name.offset  # bytes from a tensor's address to its NUL-terminated name


class GGMLInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


class GGMLCPlan(ctypes.Structure):
    """`struct ggml_cplan` from ggml-cpu.h."""

    _fields_ = [
        ("work_size", ctypes.c_size_t),
        ("work_data", ctypes.c_void_p),
        ("n_threads", ctypes.c_int),
        ("threadpool", ctypes.c_void_p),
        ("abort_callback", ctypes.c_void_p),
        ("abort_callback_data", ctypes.c_void_p),
        ("use_ref", ctypes.c_bool),
    ]


def _library(name: str) -> ctypes.CDLL:
    from llama_cpp._ctypes_extensions import load_shared_library
    import llama_cpp

    # The same files libllama was loaded with, so the same process-wide ggml state.
    return load_shared_library(name, pathlib.Path(llama_cpp.__file__).parent / "lib")


def _bind(lib, name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


class _GGML:
    """The bound functions, loaded once per process."""

    def __init__(self) -> None:
        try:
            base, cpu = _library("ggml-base"), _library("ggml-cpu")
        except (OSError, FileNotFoundError, RuntimeError) as exc:
            raise UnsupportedModel(
                "The llama.cpp lens needs the ggml libraries bundled with llama-cpp-python "
                f"(libggml-base, libggml-cpu), and this installation lacks them ({exc})."
            ) from None
        p, sz, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
        self.tensor_get = _bind(base, "ggml_backend_tensor_get", None, TensorP, p, sz, sz)
        self.tensor_set = _bind(base, "ggml_backend_tensor_set", None, TensorP, p, sz, sz)
        self.op_name = _bind(base, "ggml_op_name", ctypes.c_char_p, ctypes.c_int)
        self.type_name = _bind(base, "ggml_type_name", ctypes.c_char_p, ctypes.c_int)
        self.tensor_overhead = _bind(base, "ggml_tensor_overhead", sz)
        self.nbytes = _bind(base, "ggml_nbytes", sz, TensorP)
        self.graph_overhead = _bind(base, "ggml_graph_overhead", sz)
        self.init = _bind(base, "ggml_init", p, GGMLInitParams)
        self.free = _bind(base, "ggml_free", None, p)
        self.new_tensor_2d = _bind(base, "ggml_new_tensor_2d", TensorP, p, ctypes.c_int, i64, i64)
        self.mul_mat = _bind(base, "ggml_mul_mat", TensorP, p, TensorP, TensorP)
        self.view_3d = _bind(base, "ggml_view_3d", TensorP, p, TensorP, i64, i64, i64, sz, sz, sz)
        self.blck_size = _bind(base, "ggml_blck_size", i64, ctypes.c_int)
        self.new_graph = _bind(base, "ggml_new_graph", p, p)
        self.build_forward_expand = _bind(base, "ggml_build_forward_expand", None, p, TensorP)
        self.row_size = _bind(base, "ggml_row_size", sz, ctypes.c_int, i64)
        self.cpu_init = _bind(cpu, "ggml_cpu_init", None)
        self.graph_plan = _bind(cpu, "ggml_graph_plan", GGMLCPlan, p, ctypes.c_int, p)
        self.graph_compute = _bind(cpu, "ggml_graph_compute", ctypes.c_int, p, ctypes.POINTER(GGMLCPlan))
        self.gguf_init_from_file = _bind(base, "gguf_init_from_file", p, ctypes.c_char_p, GGUFInitParams)
        self.gguf_free = _bind(base, "gguf_free", None, p)
        self.gguf_find_key = _bind(base, "gguf_find_key", i64, p, ctypes.c_char_p)
        self.gguf_get_kv_type = _bind(base, "gguf_get_kv_type", ctypes.c_int, p, i64)
        self.gguf_get_val_str = _bind(base, "gguf_get_val_str", ctypes.c_char_p, p, i64)
        self.gguf_get_val_data = _bind(base, "gguf_get_val_data", p, p, i64)
        self.gguf_get_data_offset = _bind(base, "gguf_get_data_offset", sz, p)
        self.gguf_find_tensor = _bind(base, "gguf_find_tensor", i64, p, ctypes.c_char_p)
        self.gguf_get_tensor_offset = _bind(base, "gguf_get_tensor_offset", sz, p, i64)
        self.gguf_get_tensor_ne = _bind(base, "gguf_get_tensor_ne", ctypes.POINTER(ctypes.c_int64), p, i64)
        self.gguf_get_tensor_type = _bind(base, "gguf_get_tensor_type", ctypes.c_int, p, i64)
        self.gguf_get_tensor_size = _bind(base, "gguf_get_tensor_size", sz, p, i64)
        self._check_abi()
        self.cpu_init()

    def _check_abi(self) -> None:
        # ggml_tensor_overhead() = sizeof(struct ggml_object) (32) + sizeof(struct ggml_tensor).
        expected = ctypes.sizeof(GGMLTensor) + 32
        if self.tensor_overhead() != expected:
            raise UnsupportedModel(
                "The llama.cpp lens does not match this llama-cpp-python build (ggml tensor layout "
                f"{self.tensor_overhead()} bytes, expected {expected}). Install the version pinned in "
                "requirements.txt."
            )


_INSTANCE: _GGML | None = None
_INSTANCE_LOCK = threading.Lock()


def ggml() -> _GGML:
    global _INSTANCE
    with _INSTANCE_LOCK:
        if _INSTANCE is None:
            _INSTANCE = _GGML()
        return _INSTANCE


class TensorView:
    """A graph node handed to llama.cpp's eval callback (valid only during the callback)."""

    def __init__(self, address: int):
        self.ptr = ctypes.cast(address, TensorP)
        self.t = self.ptr.contents

    @property
    def name(self) -> str:
        return self.t.name.decode("utf-8", "replace")

    @property
    def op(self) -> str:
        return ggml().op_name(self.t.op).decode()

    def src(self, i: int) -> "TensorView | None":
        address = ctypes.cast(self.t.src[i], ctypes.c_void_p).value
        return TensorView(address) if address else None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, width) of a 2-D node: rows = tokens of the batch (or the requested outputs), width = ne0."""
        return int(self.t.ne[1]), int(self.t.ne[0])

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """All four of ggml's dimensions, numpy's order: (ne3, ne2, ne1, ne0)."""
        return int(self.t.ne[3]), int(self.t.ne[2]), int(self.t.ne[1]), int(self.t.ne[0])

    def array(self) -> np.ndarray:
        """The whole node as a numpy array [ne3, ne2, ne1, ne0] of its own dtype (float32, float16
        or int32), views with strides included (e.g. the top-k columns of an argsort).

        Copies `ggml_nbytes` bytes: for a large node, read parts with `slab` instead.
        """
        dtype = self._numpy_type()
        t = self.t
        size = ggml().nbytes(self.ptr)
        raw = np.empty(size, dtype=np.uint8)
        if size:
            ggml().tensor_get(self.ptr, raw.ctypes.data, 0, size)
        strides = (int(t.nb[3]), int(t.nb[2]), int(t.nb[1]), int(t.nb[0]))
        if strides[-1] != np.dtype(dtype).itemsize:
            raise UnsupportedModel(f"llama.cpp's node {self.name} has elements {strides[-1]} bytes apart; it cannot be read.")
        typed = np.frombuffer(raw, dtype=dtype, count=size // np.dtype(dtype).itemsize)
        return np.lib.stride_tricks.as_strided(typed, shape=self.dims, strides=strides, writeable=False).copy()

    def slab(self, i2: int, first: int, count: int) -> np.ndarray:
        """Rows [first, first + count) of plane `i2` (dimension 2, e.g. one attention head) of a
        contiguous float node whose ne3 is 1, as float32 [count, ne0]; only those bytes are copied."""
        dtype = self._numpy_type()
        t = self.t
        item = np.dtype(dtype).itemsize
        if t.ne[3] != 1 or t.nb[0] != item or t.nb[1] != t.ne[0] * item or t.nb[2] != t.ne[1] * t.nb[1]:
            raise UnsupportedModel(f"llama.cpp's node {self.name} is not contiguous; it cannot be read in slabs.")
        if not (0 <= i2 < t.ne[2] and 0 <= first and first + count <= t.ne[1]):
            raise ValueError(f"rows {first}..{first + count} of plane {i2} are outside {self.name} {list(t.ne)}")
        out = np.empty((count, t.ne[0]), dtype=dtype)
        if count:
            ggml().tensor_get(self.ptr, out.ctypes.data, i2 * t.nb[2] + first * t.nb[1], count * t.nb[1])
        return out.astype(np.float32, copy=False)

    def _numpy_type(self) -> type:
        dtype = _NUMPY_TYPES.get(int(self.t.type))
        if dtype is None:
            raise UnsupportedModel(
                f"llama.cpp's node {self.name} is {ggml().type_name(self.t.type).decode()}; only float32, float16 "
                "and int32 nodes can be read."
            )
        return dtype

    def _row_layout(self) -> type:
        t = self.t
        if t.ne[2] * t.ne[3] != 1 or t.type not in (GGML_TYPE_F32, GGML_TYPE_F16):
            raise UnsupportedModel(
                f"llama.cpp's node {self.name} is {ggml().type_name(t.type).decode()} with shape "
                f"{list(t.ne)}; only 2-D float nodes (one row a token) can be read or written."
            )
        dtype = np.float32 if t.type == GGML_TYPE_F32 else np.float16
        item = np.dtype(dtype).itemsize
        if t.nb[0] != item or t.nb[1] != t.ne[0] * item:
            raise UnsupportedModel(f"llama.cpp's node {self.name} is not contiguous; it cannot be read or written.")
        return dtype

    def rows(self, first: int, count: int) -> np.ndarray:
        """Rows [first, first + count) of a contiguous 2-D float node, as float32 [count, ne0]."""
        dtype = self._row_layout()
        out = np.empty((count, self.t.ne[0]), dtype=dtype)
        if count:
            # Works for host and device buffers alike (Metal, CUDA): ggml copies out.
            ggml().tensor_get(self.ptr, out.ctypes.data, first * self.t.nb[1], count * self.t.nb[1])
        return out.astype(np.float32, copy=False)

    def write_rows(self, first: int, values: np.ndarray) -> None:
        """Overwrite rows [first, first + len(values)) with `values` [count, ne0] (float32).

        Only inside the eval callback, once ggml has computed this node (`ask` false): every node
        computed after it reads what is written here (ggml_backend_tensor_set; any buffer type).
        """
        dtype = self._row_layout()
        values = np.ascontiguousarray(values, dtype=dtype)
        count = values.shape[0]
        if values.ndim != 2 or values.shape[1] != self.t.ne[0] or first < 0 or first + count > self.t.ne[1]:
            raise ValueError(
                f"cannot write {list(values.shape)} at row {first} of {self.name} [{self.t.ne[1]}, {self.t.ne[0]}]"
            )
        if count:
            ggml().tensor_set(self.ptr, values.ctypes.data, first * self.t.nb[1], count * self.t.nb[1])


class QuantizedMatrix:
    """A weight matrix [rows, cols] in any ggml type, multiplied in place, never dequantized.

    `data` is the tensor's bytes as stored in the GGUF (a memory map, so the pages are the
    ones llama.cpp already maps). `matmul(x)` computes x @ W.T through ggml's CPU matmul, which
    quantizes `x` to the weight's dot-product type first, as llama.cpp does for its own output
    layer; the result is llama.cpp's own logits, not an approximation of them.
    """

    def __init__(self, data: np.ndarray, ggml_type: int, rows: int, cols: int, n_threads: int = 1):
        self.data = data  # keeps the memory map alive
        self.type = int(ggml_type)
        self.rows, self.cols = int(rows), int(cols)
        self.n_threads = max(1, int(n_threads))
        g = ggml()
        if g.row_size(self.type, self.cols) * self.rows != data.nbytes:
            raise UnsupportedModel(
                f"A {g.type_name(self.type).decode()} matrix [{rows}, {cols}] should take "
                f"{g.row_size(self.type, self.cols) * self.rows} bytes, the file has {data.nbytes}."
            )
        self.type_name = g.type_name(self.type).decode()

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x [n, cols] float32 -> [n, rows] float32."""
        g = ggml()
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        out = np.empty((n, self.rows), dtype=np.float32)
        if n == 0:
            return out
        # Tensor and graph headers only: the data pointers are set to numpy buffers below.
        params = GGMLInitParams(4 * g.tensor_overhead() + g.graph_overhead() + 1024, None, True)
        ctx = g.init(params)
        if not ctx:
            raise MemoryError("ggml_init failed")
        try:
            w = g.new_tensor_2d(ctx, self.type, self.cols, self.rows)
            a = g.new_tensor_2d(ctx, GGML_TYPE_F32, self.cols, n)
            y = g.mul_mat(ctx, w, a)
            w.contents.data = self.data.ctypes.data
            a.contents.data = x.ctypes.data
            y.contents.data = out.ctypes.data
            graph = g.new_graph(ctx)
            g.build_forward_expand(graph, y)
            plan = g.graph_plan(graph, self.n_threads, None)
            work = np.empty(max(1, plan.work_size), dtype=np.uint8)
            plan.work_data = work.ctypes.data
            status = g.graph_compute(graph, ctypes.byref(plan))
            if status != 0:
                raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        finally:
            g.free(ctx)
        return out

    def matmul_heads(self, z: np.ndarray) -> np.ndarray:
        """z [heads, head_dim] float32 -> [heads, rows] float32: row h is W[:, h*head_dim:(h+1)*head_dim]
        @ z[h], each head's own columns times its own vector (an attention output projection split by
        head), with the activations rounded per block as `matmul` rounds a whole row.

        One ggml matmul over a strided view of the matrix (nothing copied): heads go in groups of as
        many as make whole quantization blocks (1 for Q8_0's 32-wide blocks and 64-wide heads, 2 for a
        K-quant's 256 and heads of 128), each group's columns times its heads' vectors with the other
        heads of the group zeroed. ValueError when the heads do not fill whole groups.
        """
        g = ggml()
        z = np.ascontiguousarray(z, dtype=np.float32)
        heads, width = z.shape
        block = int(g.blck_size(self.type))
        group = block // math.gcd(block, width)
        if heads * width != self.cols or heads % group:
            raise ValueError(f"{heads} heads of {width} do not split a {self.type_name} row of {self.cols}")
        groups, span = heads // group, group * width
        span_bytes, row_bytes = g.row_size(self.type, span), g.row_size(self.type, self.cols)
        if groups * span_bytes != row_bytes:
            raise ValueError(f"{heads} heads of {width} do not split a {self.type_name} row of {self.cols}")
        x = np.zeros((groups, group, span), dtype=np.float32)  # group k, its j-th head: z alone in its columns
        for h in range(heads):
            k, j = divmod(h, group)
            x[k, j, j * width : (j + 1) * width] = z[h]
        out = np.empty((groups, group, self.rows), dtype=np.float32)
        params = GGMLInitParams(8 * g.tensor_overhead() + g.graph_overhead() + 1024, None, True)
        ctx = g.init(params)
        if not ctx:
            raise MemoryError("ggml_init failed")
        try:
            w = g.new_tensor_2d(ctx, self.type, self.cols, self.rows)
            w.contents.data = self.data.ctypes.data
            # [span, rows, groups]: element (c, r, k) is W[r, k*span + c].
            per_group = g.view_3d(ctx, w, span, self.rows, groups, row_bytes, span_bytes, 0)
            a = g.new_tensor_2d(ctx, GGML_TYPE_F32, span, group * groups)
            a.contents.data = x.ctypes.data
            vectors = g.view_3d(ctx, a, span, group, groups, span * 4, group * span * 4, 0)
            y = g.mul_mat(ctx, per_group, vectors)  # [rows, group, groups]
            y.contents.data = out.ctypes.data
            graph = g.new_graph(ctx)
            g.build_forward_expand(graph, y)
            plan = g.graph_plan(graph, self.n_threads, None)
            work = np.empty(max(1, plan.work_size), dtype=np.uint8)
            plan.work_data = work.ctypes.data
            status = g.graph_compute(graph, ctypes.byref(plan))
            if status != 0:
                raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        finally:
            g.free(ctx)
        return out.reshape(heads, self.rows)


# gguf.h's `enum gguf_type` -> the ctypes type of a scalar value.
_GGUF_SCALARS = {
    0: ctypes.c_uint8, 1: ctypes.c_int8, 2: ctypes.c_uint16, 3: ctypes.c_int16, 4: ctypes.c_uint32,
    5: ctypes.c_int32, 6: ctypes.c_float, 7: ctypes.c_bool, 10: ctypes.c_uint64, 11: ctypes.c_int64,
    12: ctypes.c_double,
}
_GGUF_STRING = 8


@dataclass
class GGUFTensor:
    """Where one tensor lies in a GGUF file, and its bytes as a read-only memory map."""

    name: str
    type: int
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    path: str
    offset: int
    nbytes: int

    def data(self) -> np.ndarray:
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.nbytes,))


class GGUFHeader:
    """A GGUF file's header, read by llama.cpp's parser (metadata and tensor table, no data)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = str(path)
        g = ggml()
        self._ctx = g.gguf_init_from_file(self.path.encode(), GGUFInitParams(True, None))
        if not self._ctx:
            raise ValueError(f"llama.cpp cannot read the GGUF header of {self.path}")

    def close(self) -> None:
        if self._ctx:
            ggml().gguf_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> "GGUFHeader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def value(self, key: str):
        """A scalar or string metadata value, or None when the key is absent (arrays are not read)."""
        g = ggml()
        index = g.gguf_find_key(self._ctx, key.encode())
        if index < 0:
            return None
        kind = g.gguf_get_kv_type(self._ctx, index)
        if kind == _GGUF_STRING:
            return g.gguf_get_val_str(self._ctx, index).decode("utf-8", "replace")
        scalar = _GGUF_SCALARS.get(kind)
        if scalar is None:
            return None
        return ctypes.cast(g.gguf_get_val_data(self._ctx, index), ctypes.POINTER(scalar)).contents.value

    def tensor(self, name: str) -> GGUFTensor | None:
        g = ggml()
        index = g.gguf_find_tensor(self._ctx, name.encode())
        if index < 0:
            return None
        ne = g.gguf_get_tensor_ne(self._ctx, index)
        shape = tuple(int(ne[i]) for i in range(GGML_MAX_DIMS))
        while len(shape) > 1 and shape[-1] == 1:
            shape = shape[:-1]
        return GGUFTensor(
            name=name,
            type=int(g.gguf_get_tensor_type(self._ctx, index)),
            shape=shape,
            path=self.path,
            offset=int(g.gguf_get_data_offset(self._ctx) + g.gguf_get_tensor_offset(self._ctx, index)),
            nbytes=int(g.gguf_get_tensor_size(self._ctx, index)),
        )
