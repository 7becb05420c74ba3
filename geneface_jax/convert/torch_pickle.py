"""Reading `torch.save` files without PyTorch, and without running pickled code.

A `torch.save` file is a pickle whose tensors point at raw storages kept beside it. Two
layouts exist and both are read here:

- legacy (`torch.save(..., _use_new_zipfile_serialization=False)`, what GeneFace's trainer
  writes, `utils/commons/trainer.py`, `_atomic_save`): four pickles in a row (magic number,
  protocol version, system info, the object) followed by a pickled list of storage keys
  and, for each key in that order, an int64 element count and the storage's bytes;
- zip (the default since PyTorch 1.6): `<name>/data.pkl` with every storage in
  `<name>/data/<key>` (and `<name>/byteorder`).

The pickle is read by a restricted unpickler: the only callables it resolves are the
tensor rebuild functions (`torch._utils._rebuild_tensor_v2`, `_rebuild_tensor`,
`_rebuild_parameter`), `collections.OrderedDict`, NumPy scalars and dtypes (what a
trainer's bookkeeping pickles, e.g. the best validation loss) and `_codecs.encode` for
latin-1 (how protocol 2 writes bytes); torch's storage classes (`torch.FloatStorage`, ...)
are only names of dtypes. Any other global (a module, a class, `os.system`, ...) is
refused with a CheckpointError naming it, before anything is called. Tensors come back as
NumPy arrays (bfloat16 as `ml_dtypes.bfloat16`), views and strides resolved, copied out
of their storage; dicts, lists and tuples stay what they are.

`load_pickled_numpy` reads a NumPy `.npy` file holding a pickled object (what GeneFace's
binarizer writes with `np.save(..., allow_pickle=True)`, e.g. `trainval_dataset.npy`)
with the same rules plus NumPy's array reconstruction (`numpy.core.multiarray._reconstruct`,
`numpy.ndarray`): no code outside NumPy's own array constructors runs.
"""

import collections
import io
import pathlib
import pickle
import struct
import zipfile

import numpy as np

from geneface_jax.errors import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch's legacy storage classes -> dtypes (bfloat16 needs ml_dtypes, installed with JAX)
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _StorageType:
    """What `torch.FloatStorage` & co. unpickle to: the dtype of a storage, nothing else."""
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


class _Storage:
    """A storage named by a persistent id: its key, dtype and element count; the bytes are
    read after the pickle (legacy) or from `data/<key>` (zip)."""
    __slots__ = ("key", "dtype", "numel", "array")

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel, self.array = key, dtype, numel, None


class _TensorRef:
    """A tensor before its storage is read: storage, element offset, shape, strides."""
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    """`torch._utils._rebuild_tensor(_v2)`: (storage, offset, size, stride, requires_grad,
    backward_hooks[, metadata]); only the first four matter for the values."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor rebuild without a storage")
    try:
        shape = tuple(int(s) for s in size)
        strides = tuple(int(s) for s in stride)
        offset = int(storage_offset)
    except (TypeError, ValueError) as e:
        raise pickle.UnpicklingError(f"a tensor with a malformed shape ({e})") from e
    if len(shape) != len(strides):
        raise pickle.UnpicklingError(f"tensor shape {shape} and strides {strides} differ "
                                     "in length")
    return _TensorRef(storage, offset, shape, strides)


def _rebuild_parameter(data, *_unused):
    """`torch._utils._rebuild_parameter(_with_state)`: a parameter is its data."""
    return data


def _numpy_scalar(dtype, data=None):
    """`numpy.core.multiarray.scalar(dtype, bytes)`: a NumPy scalar of a plain dtype."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a NumPy scalar of an object dtype or without bytes")
    return np.frombuffer(data, dtype, count=1)[0]


def _numpy_dtype(name, align=False, copy=True):
    """`numpy.dtype(name, align, copy)`; its state is set by pickle's BUILD."""
    if not isinstance(name, str):
        raise pickle.UnpicklingError(f"numpy.dtype of {type(name).__name__}")
    return np.dtype(name, align=bool(align), copy=bool(copy))


def _latin1_encode(text, encoding="latin1", *_unused):
    """`_codecs.encode(str, 'latin1')`: how pickle protocol 2 stores bytes."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_NDARRAY_CLASSES = {("numpy", "ndarray"), ("imageio.core.util", "Array")}


def _numpy_reconstruct(cls, shape, typecode):
    """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`: an empty array whose
    state pickle's BUILD then sets (NumPy's own `ndarray.__setstate__`)."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("numpy _reconstruct of a class other than ndarray")
    return np.ndarray(shape=tuple(shape), dtype=np.dtype(typecode))


_COMMON = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _latin1_encode,
}
_NUMPY_ARRAYS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
}


def allowed_globals(numpy_arrays=False):
    """The `module.name` globals the restricted unpickler resolves (sorted)."""
    names = set(_COMMON) | {("torch", n) for n in _STORAGE_DTYPES}
    if numpy_arrays:
        names |= set(_NUMPY_ARRAYS) | _NDARRAY_CLASSES
    return sorted(f"{m}.{n}" for m, n in names)


class _Unpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals of `allowed_globals` and turns
    torch's persistent storage ids into `_Storage` records."""

    def __init__(self, file, where, *, numpy_arrays=False, storages=None):
        super().__init__(file)
        self._where = where
        self._numpy = numpy_arrays
        self.storages = {} if storages is None else storages

    def find_class(self, module, name):
        if (module, name) in _COMMON:
            return _COMMON[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_dtype(_STORAGE_DTYPES[name]))
        if self._numpy:
            if (module, name) in _NUMPY_ARRAYS:
                return _NUMPY_ARRAYS[(module, name)]
            if (module, name) in _NDARRAY_CLASSES:
                return np.ndarray
        raise CheckpointError(
            f"{self._where}: the pickle names {module}.{name}, which a file of weights does "
            f"not need; refusing to read it (only tensors, NumPy values and plain containers "
            f"are read, and no pickled code is run)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise CheckpointError(f"{self._where}: holds a pickled {kind!r} (a whole module, "
                                  "not a state_dict); save the module's state_dict instead")
        if len(pid) not in (5, 6):
            raise pickle.UnpicklingError(f"storage id of {len(pid)} fields")
        storage_type, key, _location, numel = pid[1:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of type {storage_type!r}")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
        if view is not None:
            # pre-0.4 storage views: (view key, element offset, element count)
            _view_key, offset, size = view
            return _StorageView(storage, int(offset), int(size))
        return storage


class _StorageView(_Storage):
    """A legacy view into another storage (PyTorch < 0.4)."""
    __slots__ = ("base", "start")

    def __init__(self, base, start, numel):
        super().__init__(base.key, base.dtype, numel)
        self.base, self.start = base, start


def _restricted_load(file, where, **kwargs):
    try:
        unpickler = _Unpickler(file, where, **kwargs)
        return unpickler.load(), unpickler.storages
    except CheckpointError:
        raise
    except Exception as e:        # a malformed or truncated pickle, whatever the exception
        raise CheckpointError(f"{where}: not a readable torch.save file "
                              f"({type(e).__name__}: {e})") from e


def _resolve(obj, where):
    """Replaces every `_TensorRef` in `obj` (dicts, lists, tuples) with a NumPy array."""
    if isinstance(obj, _TensorRef):
        st = obj.storage
        base = st.base.array[st.start:st.start + st.numel] if isinstance(st, _StorageView) \
            else st.array
        if base is None:
            raise CheckpointError(f"{where}: storage {st.key} is missing from the file")
        if obj.shape and min(obj.shape) == 0:
            return np.zeros(obj.shape, base.dtype)
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.shape, obj.stride))
        if obj.offset < 0 or min(obj.stride, default=0) < 0 or last >= base.size:
            raise CheckpointError(f"{where}: a tensor {obj.shape} reaches past its storage "
                                  f"{st.key} ({base.size} elements)")
        item = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[obj.offset:], shape=obj.shape, strides=tuple(s * item for s in obj.stride))
        return np.array(view)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve(v, where)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _resolve(v, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, where) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, where) for v in obj)
    if isinstance(obj, (_Storage, _StorageType)):
        raise CheckpointError(f"{where}: holds a bare storage, not a tensor")
    return obj


def _read_legacy(f, where):
    header = []
    for _ in range(3):
        header.append(_restricted_load(f, where)[0])
    if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL:
        raise CheckpointError(f"{where}: not a torch.save file (no torch magic number)")
    if not isinstance(header[2], dict) or not header[2].get("little_endian", True):
        raise CheckpointError(f"{where}: written on a big-endian machine; not supported")
    obj, storages = _restricted_load(f, where)
    keys, _ = _restricted_load(f, where)
    if not isinstance(keys, list):
        raise CheckpointError(f"{where}: malformed storage list")
    for key in keys:
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        st = storages.get(key)
        if st is None:
            raise CheckpointError(f"{where}: storage {key} is not referenced by the pickle")
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{where}: truncated before storage {key}")
        (numel,) = struct.unpack("<q", raw)
        if numel != st.numel:
            raise CheckpointError(f"{where}: storage {key} holds {numel} elements, the "
                                  f"pickle says {st.numel}")
        data = f.read(numel * st.dtype.itemsize)
        if len(data) != numel * st.dtype.itemsize:
            raise CheckpointError(f"{where}: truncated inside storage {key}")
        st.array = np.frombuffer(data, st.dtype)
    return _resolve(obj, where)


def _read_zip(path, where):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{where}: a zip file without one <name>/data.pkl "
                                  "(not a torch.save file)")
        root = pkl[0][:-len("data.pkl")]
        order = "little"
        if root + "byteorder" in names:
            order = z.read(root + "byteorder").decode("ascii").strip()
        with z.open(pkl[0]) as f:
            obj, storages = _restricted_load(io.BytesIO(f.read()), where)
        for key, st in storages.items():
            name = f"{root}data/{key}"
            if name not in names:
                raise CheckpointError(f"{where}: storage {key} is missing ({name})")
            data = z.read(name)
            if len(data) != st.numel * st.dtype.itemsize:
                raise CheckpointError(f"{where}: storage {key} holds {len(data)} bytes, "
                                      f"expected {st.numel} x {st.dtype.itemsize}")
            dtype = st.dtype.newbyteorder("<" if order == "little" else ">")
            st.array = np.frombuffer(data, dtype).astype(st.dtype, copy=False)
    return _resolve(obj, where)


def load_torch_file(path):
    """The object `torch.save` wrote to `path` (legacy or zip layout), tensors as NumPy
    arrays; CheckpointError for anything else, a truncated file or a pickle that names a
    callable outside `allowed_globals()`."""
    path = pathlib.Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    if zipfile.is_zipfile(path):
        return _read_zip(path, where)
    with open(path, "rb") as f:
        return _read_legacy(f, where)


def load_pickled_numpy(path):
    """The object a NumPy `.npy` file holds when it was saved from a Python object (a dict
    of arrays, GeneFace's `trainval_dataset.npy`), read with the restricted unpickler plus
    NumPy's array constructors; plain arrays come back as arrays."""
    path = pathlib.Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                      else np.lib.format.read_array_header_2_0(f))
        except ValueError as e:
            raise CheckpointError(f"{where}: not a .npy file ({e})") from e
        shape, fortran, dtype = header
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        obj, _ = _restricted_load(f, where, numpy_arrays=True)
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        return obj.item()
    return obj
