"""The optimizer's checkpoint state: what ``megarank.checkpoint`` saves for megatron-core's optimizers and how it is
put back. The checkpoint package knows no optimizer internals; the training loop hands it a
:class:`MegatronOptimizerState` (megarank.checkpoint.OptimizerState protocol)."""
import torch

from megarank.training.optimizer import inner_optimizers


class MegatronOptimizerState:
    """megarank.checkpoint.OptimizerState for a megatron-core optimizer of the unwrapped ``model``."""

    def __init__(self, optimizer, model):
        self.optimizer, self.model = optimizer, model

    def sharded_state_dict(self, is_loading: bool, saved_keys=None) -> dict:
        return optimizer_sharded_state_dict(self.optimizer, self.model, is_loading, saved_keys=saved_keys)

    def restore(self, loaded: dict) -> None:
        restore_optimizer_state(self.optimizer, loaded)

    def reload_model_params(self) -> None:
        self.optimizer.reload_model_params()


def untie_step_counters(optimizer) -> None:
    """After ``load_state_dict`` every param state shares one ``step`` tensor, so torch's AdamW increments it
    once per parameter and a resumed run diverges (megatron-core 0.16.1): give each state its own copy."""
    for opt in inner_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].clone()


#
# What checkpointing needs from the optimizer, and nothing else: ``optimizer_sharded_state_dict`` (what to
# hand to ``dist_checkpointing.save`` / ``.load``) and ``restore_optimizer_state`` (put what was loaded back).
#
# The distributed optimizer's state is saved in *model space* (one global tensor per parameter and state key:
# ``optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<param key>``, the same keys and shapes as megatron's
# 'fully_reshardable' format and as the plain optimizer's checkpoints), so it loads at any TP/PP/DP, and
# checkpoints written in 'fully_reshardable' form load too. (Switching `use_distributed_optimizer` between
# save and resume is not supported: the two optimizers' param-group state differs.) Unlike 'fully_reshardable', nothing is gathered: megatron-core 0.16.1 builds that
# format by all-gathering every DP rank's shard onto every DP rank as CPU tensors
# (distrib_optimizer.py:1443-1450 -> get_parameter_state_dp_zero), i.e. each rank holds the whole state of
# its TP x PP slice at every save; with `distrib_optim_fully_reshardable_mem_efficient` it gathers onto DP
# rank 0 instead, which still holds all of it and then writes it alone. megatron's gather-free model-space
# format ('fully_sharded_model_space', distrib_optimizer.py:1689) describes a DP rank's part of a parameter
# with `ShardedTensor.flattened_range`, which 0.16.1 rejects at construction (mapping.py:133-134); 'dp_reshardable'
# is gather-free but stores megatron's internal bucket layout and reshards over DP only.
#
# So each DP rank describes its own contiguous slice [start, end) of a parameter's flattened local tensor as a
# few rectangular boxes (a partial row, the full rows, a partial row, per dimension) -- ordinary ShardedTensors
# with an irregular grid (axis_fragmentations=None, as 'dp_reshardable' uses; validation defers such keys to
# torch DCP, validation.py:465-467). The box data are views of the optimizer's own tensors: a save copies
# nothing and every rank writes only what it owns. A load requests the boxes of the new layout; DCP reads the
# overlapping parts of whatever boxes were written, and megatron's own `load_parameter_state_from_fs_model_space`
# (distrib_optimizer.py:1807) puts the flat slices back.

STATE_PREFIX = "optimizer.state"


def _init_optimizer_state(optimizer) -> None:
    """A fresh optimizer has no Adam state to load into; create it with one zero-gradient, lr-0 step
    (lr 0 so decoupled weight decay does not move the weights)."""
    for opt in inner_optimizers(optimizer):
        groups = opt.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
        else:
            for g in groups:
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            opt.optimizer.step()
            opt.optimizer.zero_grad()
        for g, lr in zip(groups, saved):
            g["lr"] = lr


def flat_range_boxes(shape: tuple, start: int, end: int) -> list:
    """The rectangular boxes (offset, shape) that cover elements [start, end) of a C-contiguous tensor of
    ``shape``, in flat order: at most 2 per dimension."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))]
    inner = 1
    for s in shape[1:]:
        inner *= s
    row0, col0 = divmod(start, inner)
    row1, col1 = divmod(end, inner)
    if row0 == row1:
        return [((row0, *o), (1, *b)) for o, b in flat_range_boxes(shape[1:], col0, col1)]
    boxes = []
    if col0:
        boxes += [((row0, *o), (1, *b)) for o, b in flat_range_boxes(shape[1:], col0, inner)]
        row0 += 1
    if row1 > row0:
        boxes.append(((row0, *(0,) * (len(shape) - 1)), (row1 - row0, *shape[1:])))
    if col1:
        boxes += [((row1, *o), (1, *b)) for o, b in flat_range_boxes(shape[1:], 0, col1)]
    return boxes


def _plain_shards(model_sh) -> list:
    """The plain ShardedTensors a model entry saves as (a factory, e.g. SwiGLU's fc1, splits the local tensor
    into chunks with their own global placement), each with its element offset in the local tensor."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    param = model_sh.data
    subs = list(nested_values(model_sh.build())) if isinstance(model_sh, ShardedTensorFactory) else [model_sh]
    out = []
    for sub in subs:
        offset = (sub.data.data_ptr() - param.data_ptr()) // param.element_size()
        if not sub.data.is_contiguous() or not 0 <= offset < param.numel() or sub.data.numel() + offset > param.numel():
            raise NotImplementedError(f"{model_sh.key}: a checkpoint factory that does not split the parameter "
                                      "into contiguous chunks is not supported by the optimizer checkpoint")
        out.append((offset, sub))
    return sorted(out, key=lambda x: x[0])


def _boxes(model_sh, start: int, end: int) -> list:
    """[(flat_lo, flat_hi, sub_sharded_tensor, offset_in_sub, box_shape)] covering [start, end) of the param."""
    result = []
    for offset, sub in _plain_shards(model_sh):
        lo, hi = max(start, offset), min(end, offset + sub.data.numel())
        if lo >= hi:
            continue
        pos = lo
        for o, b in flat_range_boxes(tuple(sub.data.shape), lo - offset, hi - offset):
            n = 1
            for s in b:
                n *= s
            result.append((pos - start, pos - start + n, sub, o, b))
            pos += n
        assert pos == hi
    return result


def _box_tensor(key: str, data: torch.Tensor, sub, offset: tuple, shape: tuple, instance_id: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    # The model's replica_id is (PP, TP, DP): the weights are replicated over DP, the optimizer shards are not,
    # so the DP coordinate becomes the optimizer instance (as in distrib_optimizer.py:1719-1723).
    if not (isinstance(sub.replica_id, tuple) and len(sub.replica_id) == 3):
        raise ValueError(f"{sub.key}: expected a (PP, TP, DP) replica_id, got {sub.replica_id}")
    replica_id = (*sub.replica_id[:2], instance_id)
    # Prepended axes (the layer index of stacked layers) become real size-1 dims of the box: megatron's
    # irregular-grid path hands the local shape to DCP as is (strategies/torch.py:296-308).
    p = sub.prepend_axis_num
    global_offset = (*sub.global_offset[:p], *(g + o for g, o in zip(sub.global_offset[p:], offset)))
    local_shape = (1,) * p + tuple(shape)
    return ShardedTensor(key, data.view(local_shape), data.dtype, local_shape, tuple(sub.global_shape),
                         global_offset, axis_fragmentations=None, replica_id=replica_id)


def _main_param_is_model_param(main: torch.Tensor, model_param: torch.Tensor) -> bool:
    # fp32 training: the distributed optimizer's main param is a view of the model weight (saved in model/)
    return main.untyped_storage().data_ptr() == model_param.untyped_storage().data_ptr()


def _distopt_param_state(opt, model_sd: dict, is_loading: bool, saved_keys=None) -> dict:
    """{param_idx: {state key: [box ShardedTensors]}} of this DP rank's slices, in the order of
    megatron's `load_parameter_state_from_fs_model_space`. ``saved_keys``: keys present in the checkpoint
    being loaded (older 'fully_reshardable' checkpoints name the fp32 master 'param')."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    by_param = {sh.data: sh for sh in nested_values(model_sd) if isinstance(sh, (ShardedTensor, ShardedTensorFactory))}
    state = {}
    for idx, (model_param, r) in enumerate(_distopt_params(opt)):
        model_sh = by_param.get(model_param)
        if model_sh is None:
            raise KeyError("a parameter of the distributed optimizer is not in the model's sharded state dict")
        tensors = dict(opt._get_main_param_and_optimizer_states(model_param))
        tensors.pop("step", None)  # restored from the param groups (common state)
        main = tensors.pop("param")
        if not _main_param_is_model_param(main, model_param):
            tensors["fp32_param"] = main
        entry = {}
        for name, flat in tensors.items():
            key = f"{STATE_PREFIX}.{name}.{model_sh.key}"
            if saved_keys is not None and name == "fp32_param" and key not in saved_keys:
                key = f"{STATE_PREFIX}.param.{model_sh.key}"
            src = torch.empty_like(flat) if is_loading else flat
            entry[name] = [_box_tensor(key, src[lo:hi], sub, o, b, opt.distributed_optimizer_instance_id)
                           for lo, hi, sub, o, b in _boxes(model_sh, r.start, r.end)]
        state[idx] = entry
    return state


def _distopt_params(opt):
    """(model param, its Range in the flattened param) of this DP rank, in megatron's param-state order."""
    for gbuf_range_maps in opt.gbuf_ranges:
        for per_bucket in gbuf_range_maps.values():
            for gbuf_range_map in per_bucket:
                for model_param, range_map in gbuf_range_map["param_map"].items():
                    yield model_param, range_map["param"]


def _is_distributed(opt) -> bool:
    return hasattr(opt, "gbuf_ranges") and hasattr(opt, "_get_main_param_and_optimizer_states")


def optimizer_sharded_state_dict(optimizer, model, is_loading: bool, saved_keys=None) -> dict:
    """What ``dist_checkpointing.save``/``.load`` take for the optimizer of the unwrapped ``model``.

    Loading: creates the optimizer's state first (a fresh optimizer has none to load into); pass the keys of
    the checkpoint (``dist_checkpointing.load_tensors_metadata``) as ``saved_keys``. Every DP rank describes
    only its own shard of the distributed optimizer (see the comment above); plain optimizers keep megatron's
    own sharded state dict (model space, written once per DP replica group, no gather).
    """
    if is_loading:
        _init_optimizer_state(optimizer)
    model_sd = model.sharded_state_dict()
    parts = []
    for opt in inner_optimizers(optimizer):
        if _is_distributed(opt):
            sd = opt.state_dict()  # param groups (incl. step) and grad scaler: the same on every rank
            sd["param_state"] = _distopt_param_state(opt, model_sd, is_loading, saved_keys)
            sd["param_state_sharding_type"] = "fully_sharded_model_space"
        else:
            sd = opt.sharded_state_dict(model_sd, is_loading=is_loading)
        parts.append(sd)
    return parts[0] if len(parts) == 1 else dict(enumerate(parts))


def restore_optimizer_state(optimizer, loaded: dict) -> None:
    """Put what ``dist_checkpointing.load`` returned for ``optimizer_sharded_state_dict(..., is_loading=True)``
    back into the optimizer."""
    opts = inner_optimizers(optimizer)
    parts = [loaded] if len(opts) == 1 else [loaded[i] for i in range(len(opts))]
    for opt, sd in zip(opts, parts):
        if _is_distributed(opt):
            # boxes -> this rank's flat slices, the form `load_parameter_state_from_fs_model_space` takes
            flat = {}
            for idx, (model_param, _) in enumerate(_distopt_params(opt)):
                entry = {("param" if name == "fp32_param" else name): torch.cat([t.reshape(-1) for t in boxes])
                         for name, boxes in sd["param_state"][idx].items()}
                # fp32: the main param is a view of the model weight, which model/ restored already
                entry.setdefault("param", opt._get_main_param_and_optimizer_states(model_param)["param"].clone())
                flat[idx] = entry
            sd["param_state"] = flat
            sd["param_state_sharding_type"] = "fully_sharded_model_space"
        opt.load_state_dict(sd)
    untie_step_counters(optimizer)
