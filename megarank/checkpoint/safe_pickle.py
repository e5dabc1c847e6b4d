"""Read a checkpoint's pickles without running them: every pickle megarank loads from a checkpoint folder goes
through an allow-list, and a file that names anything else is refused with one line naming the file and the
global, before any of it is called.

The pickles in a megarank checkpoint folder (a training step's or a converted one) and who reads them:

- ``model/.metadata``, ``optimizer/.metadata``, ``extra_state/.metadata`` -- torch DCP's ``Metadata``, read by
  ``FileSystemReader.read_metadata`` with a plain ``pickle.load`` (torch/distributed/checkpoint/filesystem.py:926-936,
  torch 2.13). megatron-core's ``torch_dist`` load strategy builds that reader itself, in the module function
  ``_get_filesystem_reader`` (megatron/core/dist_checkpointing/strategies/torch.py:750-760, megatron-core 0.16.1),
  called by ``TorchDistLoadShardedStrategy.load`` (:798), ``load_tensors_metadata`` (:826) and
  ``load_sharded_metadata`` (:843); there is no argument to hand it another reader. Here the metadata is read by
  :class:`SafeFileSystemReader` (:class:`MetadataUnpickler`, allow-list :data:`METADATA_GLOBALS` plus the
  ``torch`` dtypes), and :class:`SafeTorchDistLoadStrategy` makes megatron's three methods use it: the first
  through its ``metadata`` argument, the other two by swapping ``_get_filesystem_reader`` for the length of the call
  (:func:`_safe_readers`; restored after, whatever happens).
- ``*/common.pt`` -- megatron's common state (``{}`` for the weights, the optimizer's ``param_groups``), read by
  ``TorchCommonLoadStrategy.load_common`` with ``torch.load(load_path, map_location='cpu')`` (strategies/common.py:89):
  ``weights_only`` is left to torch's default, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns off
  (torch/serialization.py:1484-1502). :class:`SafeTorchCommonLoadStrategy` reads it with :func:`torch_load`.
- ``*.distcp`` -- each tensor chunk is a ``torch.save`` that DCP reads with ``weights_only=True``
  (filesystem.py:897-903); each stored *object* (a megatron ``ShardedObject``, e.g. Transformer Engine's
  ``_extra_state``) goes to ``DefaultLoadPlanner.load_bytes``, which reads it with ``torch.load(weights_only=False)``
  (torch/distributed/checkpoint/default_planner.py:382-392). :class:`SafeFileSystemReader` reads objects with
  :func:`torch_load` first and hands the planner only bytes that passed.
- ``extra_state/`` -- the objects above are Transformer Engine's FP8 ``_extra_state``: byte tensors that TE
  itself unpickles with a plain ``pickle.loads`` when they are put into the model; ``megarank.checkpoint.weights``
  first reads each through :class:`ExtraStateUnpickler` (:func:`check_extra_state`).
- ``train_state/rank-*.pt`` -- step, scheduler, data position and RNG states, read by
  ``megarank.checkpoint.train_state.load_train_state`` with :func:`torch_load`.

:func:`torch_load` is ``torch.load(weights_only=True)`` with torch's own allow-list only: importing megatron-core
adds its classes to torch's process-wide list (megatron/core/safe_globals.py:19-42, registered at
megatron/core/__init__.py:49-52: ``SimpleNamespace``, ``argparse.Namespace``, numpy arrays, ``OptimizerConfig``,
...), and no megarank file holds any of them, so they are set aside while a checkpoint file is read.

The allow-lists are what megarank checkpoints hold, found by logging every ``find_class`` of real checkpoints
(a tiny training step at one rank and at TP=2, converted checkpoints in fp32 and bf16, an object saved through
megatron's ``ShardedObject``): ``.metadata`` names the classes below; ``common.pt`` names none; ``train_state/rank-*.pt``
names ``collections.OrderedDict``, ``torch.ByteStorage`` and ``torch._utils._rebuild_tensor_v2``, all in torch's
own weights-only list. The manifest's CRC-32 (megarank/checkpoint/integrity.py) is no defence here: whoever can
change a file can rewrite its checksum.
"""
from __future__ import annotations

import io
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

from megarank.checkpoint.layout import CheckpointError

# What DCP's Metadata pickle holds, as written by megatron-core 0.16.1's torch_dist save on torch 2.13.
METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id as checkpoint_tools/megatron_writer.py saves it
    # torch.layout pickles as a call of this lookup by name (torch/serialization.py:1641-1653)
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    # megatron keeps every rank's save plan in the metadata (``all_local_plans``, strategies/state_dict_saver.py:141-144)
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
})


class RefusedPickle(CheckpointError):
    """A checkpoint file whose pickle names a global megarank does not load; nothing of it was run."""


def _refused(where, global_name: str) -> RefusedPickle:
    return RefusedPickle(f"{where} refers to {global_name}, which is not on megarank's allow-list for checkpoint "
                         "files: refused without running it (loading a checkpoint must not run code it carries)")


class _AllowListUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (Lib/pickle.py) with ``find_class`` left to :meth:`allowed` and attributes set on
    instances only: its BUILD opcode (``load_build``, pickle.py:1712-1733) would otherwise ``setattr`` on an
    allowed *class* and change it for the whole process (the C unpickler offers no hook for that)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, where):
        super().__init__(file)
        self.where = where

    def _load_build(self) -> None:
        target = self.stack[-2]  # BUILD: the state on top, the object it is applied to below it
        if isinstance(target, type):
            raise RefusedPickle(f"{self.where} sets attributes of the class {target.__module__}.{target.__qualname__}: "
                                "refused without running it (loading a checkpoint must not run code it carries)")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str):
        found = self.allowed(module, name)
        if found is None:
            raise _refused(self.where, f"{module}.{name}")
        return found

    def allowed(self, module: str, name: str):
        """The object ``module.name`` stands for, or None when it is not allowed."""
        raise NotImplementedError


class MetadataUnpickler(_AllowListUnpickler):
    """An Unpickler for DCP ``.metadata`` files that resolves only :data:`METADATA_GLOBALS` and ``torch`` dtypes."""

    def allowed(self, module: str, name: str):
        import torch

        if (module, name) in METADATA_GLOBALS:
            return pickle._Unpickler.find_class(self, module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return None


def load_metadata(path) -> object:
    """The DCP ``Metadata`` pickled in ``path``, read through :class:`MetadataUnpickler`."""
    with open(path, "rb") as f:
        return MetadataUnpickler(f, path).load()


@contextmanager
def _torch_allow_list_only():
    """Set aside the globals others added to torch's weights-only list (megatron-core's) for the block."""
    import torch

    added = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        yield
    finally:
        torch.serialization.add_safe_globals(added)


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+\w)")


def torch_load(source, where=None, mmap: bool = False):
    """``torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)`` with torch's own allow-list only; a
    global it refuses becomes a :class:`RefusedPickle` naming ``where`` (default: ``source``) and the global."""
    import torch

    where = source if where is None else where
    try:
        with _torch_allow_list_only():
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the global: "Unsupported global: GLOBAL types.SimpleNamespace was
        # not an allowed global ..." / "Trying to load unsupported GLOBAL posix.system whose module ..."
        # (torch/_weights_only_unpickler.py)
        found = _GLOBAL_IN_MESSAGE.search(str(e))
        if found is None:
            raise
        raise _refused(where, found.group(1)) from None


_TE_RECIPE_MODULE = "transformer_engine.common.recipe"


class ExtraStateUnpickler(_AllowListUnpickler):
    """An Unpickler for Transformer Engine's ``_extra_state`` (FP8 scales, amax history and the recipe), which TE
    reads back with a plain ``pickle.loads`` in ``set_extra_state`` (transformer_engine/pytorch/module/base.py,
    ``TransformerEngineBaseModule.set_extra_state``, v2.9). The state is a dict of builtins, CPU tensors and the
    FP8 recipe. A tensor pickled outside ``torch.save`` names ``torch._utils._rebuild_tensor_v2``,
    ``collections.OrderedDict`` (its hooks) and ``torch.storage._load_from_bytes``, which would run a
    ``torch.load(weights_only=False)`` of the storage bytes (torch/storage.py:534-535): here those bytes go through
    :func:`torch_load` instead. The recipe is one of the dataclasses, enums and named tuples defined in
    ``transformer_engine.common.recipe`` (allowed only once TE has imported it); every other global is refused."""

    _TORCH = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")}

    def allowed(self, module: str, name: str):
        import dataclasses
        import enum
        import sys

        if (module, name) in self._TORCH:
            return pickle._Unpickler.find_class(self, module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda data: torch_load(io.BytesIO(data), where=self.where)
        cls = getattr(sys.modules.get(_TE_RECIPE_MODULE), name, None) if module == _TE_RECIPE_MODULE else None
        if (isinstance(cls, type) and cls.__module__ == _TE_RECIPE_MODULE
                and (dataclasses.is_dataclass(cls) or issubclass(cls, (enum.Enum, tuple)))):
            return cls
        return None


def check_extra_state(value, where) -> None:
    """Read one loaded ``_extra_state`` value the way Transformer Engine will (a byte tensor holding a pickle, or
    the deprecated ``io.BytesIO`` holding a ``torch.save``), through the allow-lists; raise :class:`RefusedPickle`
    naming ``where`` and the global if TE's own unpickling would resolve anything else."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() > 0:
        ExtraStateUnpickler(io.BytesIO(value.detach().cpu().numpy().tobytes()), where).load()
    elif isinstance(value, io.BytesIO):
        torch_load(io.BytesIO(value.getvalue()), where=where)


def _fs_reader_base():
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )

    return CachedMetadataFileSystemReader


class _ObjectsChecked:
    """A DCP load planner whose ``load_bytes`` is given only objects that :func:`torch_load` read."""

    def __init__(self, planner, where):
        self._planner, self._where = planner, where

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value) -> None:
        data = value.getvalue()
        torch_load(io.BytesIO(data), where=f"{self._where} (object {read_item.dest_index.fqn})")
        self._planner.load_bytes(read_item, io.BytesIO(data))


def _make_safe_reader_class():
    base = _fs_reader_base()

    class SafeFileSystemReader(base):
        """megatron's metadata-caching DCP reader (strategies/cached_metadata_filesystem_reader.py) that reads
        ``.metadata`` through :class:`MetadataUnpickler` when it is made (so a refusal is raised before DCP's
        collective load starts, which would wrap it) and objects through :func:`torch_load`."""

        def __init__(self, path) -> None:
            super().__init__(path)
            self._cached_metadata = self._read_metadata_safely()

        def _read_metadata_safely(self, rank=None):
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

            path = Path(self._get_metadata_path(rank))
            metadata = load_metadata(path)
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{path} is damaged (not torch distributed-checkpoint metadata)")
            # what FileSystemReader.read_metadata does after the pickle.load (filesystem.py:932-934)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            return self._cached_metadata if rank is None else self._read_metadata_safely(rank)

        def read_data(self, plan, planner):
            with _torch_allow_list_only():
                return super().read_data(plan, _ObjectsChecked(planner, self.path))

    return SafeFileSystemReader


_READER_CLASS = None


def safe_filesystem_reader(checkpoint_dir, cache_metadata: bool = False):
    """A DCP reader of ``checkpoint_dir`` whose pickles go through the allow-lists; the signature of megatron's
    ``_get_filesystem_reader`` (strategies/torch.py:750-752). Its metadata is always cached (read once, when made);
    megatron's multi-storage-client reader (``MultiStorageClientFeature``), which megarank never enables, is not
    offered."""
    global _READER_CLASS
    if _READER_CLASS is None:
        _READER_CLASS = _make_safe_reader_class()
    return _READER_CLASS(checkpoint_dir)


@contextmanager
def _safe_readers():
    """megatron's torch_dist strategy builds its reader with ``_get_filesystem_reader`` (strategies/torch.py:750-760):
    use :func:`safe_filesystem_reader` instead for the block."""
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    original = getattr(torch_strategy, "_get_filesystem_reader", None)
    if original is None:  # the contract above moved: fail loudly rather than read with plain pickle
        raise RuntimeError("megatron.core.dist_checkpointing.strategies.torch has no _get_filesystem_reader; "
                           "megarank.checkpoint.safe_pickle must follow the installed megatron-core")
    torch_strategy._get_filesystem_reader = safe_filesystem_reader
    try:
        yield
    finally:
        torch_strategy._get_filesystem_reader = original


def _strategies():
    """(sharded, common) load strategies for ``dist_checkpointing.load`` and friends, reading through the allow-lists."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    class SafeTorchDistLoadStrategy(TorchDistLoadShardedStrategy):
        """megatron's torch_dist load strategy (strategies/torch.py:763-856) reading through the allow-lists."""

        def check_backend_compatibility(self, loaded_backend):
            if loaded_backend != "torch_dist":  # the backend metadata.json names must not pick another reader
                raise CheckpointError(f"a megarank checkpoint's tensors are stored by torch_dist, not {loaded_backend}")

        def load(self, sharded_state_dict, checkpoint_dir):
            with _safe_readers():
                return super().load(sharded_state_dict, checkpoint_dir)

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            if metadata is None:
                metadata = safe_filesystem_reader(checkpoint_dir).read_metadata()
            return super().load_tensors_metadata(checkpoint_dir, metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            with _safe_readers():
                return super().load_sharded_metadata(checkpoint_dir)

    class SafeTorchCommonLoadStrategy(TorchCommonLoadStrategy):
        """megatron's common-state strategy (strategies/common.py:71-98) reading ``common.pt`` with
        :func:`torch_load`. Its ``load_sharded_objects`` (objects as separate ``.pt`` files) is never reached with
        the torch_dist strategy, which stores objects itself (``can_handle_sharded_objects``; serialization.py:152)."""

        def check_backend_compatibility(self, loaded_backend):
            if loaded_backend != "torch":
                raise CheckpointError(f"a megarank checkpoint's common state is stored by torch, not {loaded_backend}")

        def load_common(self, checkpoint_dir):
            from megatron.core.dist_checkpointing.core import CheckpointingException
            from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

            path = Path(checkpoint_dir) / COMMON_STATE_FNAME
            if not path.is_file():
                raise CheckpointingException(f"Common file {path} does not exist")
            return torch_load(str(path))

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise CheckpointError(f"{checkpoint_dir} stores objects as separate files, which megarank does not read")

    return SafeTorchDistLoadStrategy(), SafeTorchCommonLoadStrategy()


def _refusal_inside(e: BaseException):
    """The RefusedPickle that DCP wrapped in a CheckpointException (torch/distributed/checkpoint/utils.py:194-220),
    or None."""
    for failure in getattr(e, "failures", {}).values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, RefusedPickle):
            return exc
    return None


def load(sharded_state_dict, checkpoint_dir, **kwargs):
    """``megatron.core.dist_checkpointing.load`` (serialization.py:61) with every pickle read through the
    allow-lists; a refused file is a :class:`RefusedPickle` however deep in DCP it was found."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    sharded, common = _strategies()
    try:
        return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), sharded_strategy=sharded,
                                       common_strategy=common, **kwargs)
    except CheckpointException as e:
        refused = _refusal_inside(e)
        if refused is None:
            raise
        raise RefusedPickle(str(refused)) from None


def load_tensors_metadata(checkpoint_dir):
    """``megatron.core.dist_checkpointing.load_tensors_metadata`` (serialization.py:196) reading ``.metadata``
    through :class:`MetadataUnpickler`."""
    from megatron.core import dist_checkpointing

    sharded, _ = _strategies()
    return dist_checkpointing.load_tensors_metadata(str(checkpoint_dir), sharded_strategy=sharded)
