"""Expert parallelism for rewritten models, on transformers' own EP machinery.

Legend: T tokens (this rank), K top-k, E logical experts, P physical slots, G expert-parallel
ranks (devices), M routed pairs.

transformers 5.x runs MoE models expert-parallel under torchrun with
``DistributedConfig(ep_size=G, fsdp_size=G)``: the model's ``ep_plan`` names the experts module
with the ``ep_dispatch_experts`` style, whose ``EPImplementation`` (chosen by
``DistributedConfig.ep_implementation`` from ``EPImplementationInterface``) brings each rank's
tokens to the experts' ranks. Its own implementations assume contiguous experts (expert e on rank
``e // (E / G)``). A rewritten model's slots are placed anywhere (routing map v2, ``slot_device``)
and an expert can have replicas on several ranks, so rq registers one more implementation,
``"rq_replicas"`` (:class:`ReplicaAllToAllEP`), and plans the experts modules with the same
``ep_dispatch_experts`` style (so FSDP keeps them out of the dense shards). Per MoE layer and step:

1. every rank all-gathers its expert counts ``[E]`` -> the step's counts and this rank's
   position in each expert's occurrences (``counts_before``), the ranks' batches concatenated
   in rank order;
2. the layer's split policy picks each pair's slot exactly as a single process would on the
   whole step (``RQExperts.choose_slots``, ``kernels.replica_choice``);
3. the pairs go to their slot's rank by all-to-all (rows + the slot's index on that rank), that
   rank runs its materialised slots on them (``RQExperts.forward_local``), and a second
   all-to-all brings the rows back, weighted and summed per token on the sender in fp32 (the
   single-process combine order).

Every rank materialises only its own slots (``ExpertParallel.slots``; the loader reads only
those rows of the checkpoint). Per-rank counters of routed pairs and time per layer and step
are read with :func:`ep_counters` (also for the original model run with
``ep_implementation="rq_counting_all_to_all"``: transformers' all-to-all, counted).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import RQError
from .experts import RQExperts
from .routing_map import LayerMap, RoutingMap

EP_IMPLEMENTATION = "rq_replicas"
COUNTING_IMPLEMENTATION = "rq_counting_all_to_all"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _tep():
    from transformers.distributed import expert_parallel as tep

    return tep


def _record(stats: list, pairs: int, expert_s: float, layer_s: float, sent: list[int]) -> None:
    stats.append({"pairs": pairs, "expert_s": expert_s, "layer_s": layer_s, "sent": sent})


def _make_implementations():
    """The two EPImplementation subclasses (built lazily: transformers' distributed module needs torch.distributed)."""
    tep = _tep()

    class ReplicaAllToAllEP(tep.EPImplementation):
        """Tokens to the rank of the replica the layer's split policy chooses, and back (module docstring)."""

        def __init__(self, experts, ep_mesh, tp_mesh):
            super().__init__(experts, ep_mesh, tp_mesh)
            if not isinstance(experts, RQExperts):
                raise ValueError(f"ep_implementation={EP_IMPLEMENTATION!r} runs rq's RQExperts modules, "
                                 f"not {type(experts).__name__}")
            if tp_mesh.size() != 1:
                raise ValueError(f"ep_implementation={EP_IMPLEMENTATION!r} needs tp_size=1 (ranks holding distinct batches)")
            self.experts, self.group = experts, ep_mesh.get_group()
            self.G, self.rank = ep_mesh.size(), ep_mesh.get_local_rank()
            dev = experts.slot_device.cpu()
            if experts.num_devices != self.G or not torch.equal(experts.local_slots, (dev == self.rank).nonzero().flatten()):
                raise ValueError(f"layer {experts.layer}: its slots were materialised for another placement")
            # index of every slot among the slots of its own rank (they are held in increasing slot order)
            local_index = torch.empty_like(dev)
            for g in range(self.G):
                mine = (dev == g).nonzero().flatten()
                local_index[mine] = torch.arange(mine.numel())
            self.local_index = local_index.to(experts.slot_device.device)
            self.stats: list[dict] = []
            experts._rq_ep = self

        def __call__(self, hidden_states, top_k_index, top_k_weights):
            t0 = time.perf_counter()
            ex, G, group = self.experts, self.G, self.group
            T, K = top_k_index.shape
            H = hidden_states.shape[-1]
            counts = torch.bincount(top_k_index.reshape(-1), minlength=ex.num_experts)
            all_counts = torch.empty(G * ex.num_experts, dtype=counts.dtype, device=counts.device)
            dist.all_gather_into_tensor(all_counts, counts, group=group)
            all_counts = all_counts.view(G, ex.num_experts)
            phy = ex.choose_slots(top_k_index, all_counts[: self.rank].sum(0), all_counts.sum(0)).reshape(-1)
            dest = ex.slot_device[phy]
            order = torch.argsort(dest, stable=True)
            send_counts = torch.bincount(dest, minlength=G)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=group)
            send, recv = send_counts.tolist(), recv_counts.tolist()  # the layer's one host sync
            x = hidden_states[order // K].contiguous()
            rx = x.new_empty(sum(recv), H)
            dist.all_to_all_single(rx, x, recv, send, group=group)
            slot = self.local_index[phy[order]]
            rslot = slot.new_empty(sum(recv))
            dist.all_to_all_single(rslot, slot, recv, send, group=group)
            t1 = time.perf_counter()
            y = ex.forward_local(rx, rslot)
            t2 = time.perf_counter()
            back = y.new_empty(T * K, H)
            dist.all_to_all_single(back, y.contiguous(), send, recv, group=group)
            out = torch.empty(T * K, H, dtype=torch.float32, device=hidden_states.device)
            out[order] = back.float() * top_k_weights.reshape(-1).float()[order, None]
            result = out.view(T, K, H).sum(1).to(hidden_states.dtype)
            _record(self.stats, sum(recv), t2 - t1, time.perf_counter() - t0, send)
            return result

    class CountingAllToAllEP(tep.AllToAllEP):
        """transformers' own all-to-all (contiguous experts), with the same counters as rq's."""

        def __init__(self, experts, ep_mesh, tp_mesh):
            super().__init__(experts, ep_mesh, tp_mesh)
            self.stats: list[dict] = []
            self._step: dict = {}
            inner = self.experts_forward

            def counted(tokens, expert_ids, weights):
                t = time.perf_counter()
                out = inner(tokens, expert_ids, weights)
                self._step.update(pairs=int(tokens.shape[0]), expert_s=time.perf_counter() - t)
                return out

            self.experts_forward = counted
            experts._rq_ep = self

        def __call__(self, hidden_states, top_k_index, top_k_weights):
            t0 = time.perf_counter()
            self._step = {}
            out = super().__call__(hidden_states, top_k_index, top_k_weights)
            dest = top_k_index.reshape(-1) // self.num_local_experts
            sent = torch.bincount(dest, minlength=self.ep_mesh.size()).tolist()
            _record(self.stats, self._step["pairs"], self._step["expert_s"], time.perf_counter() - t0, sent)
            return out

    return ReplicaAllToAllEP, CountingAllToAllEP


def register() -> None:
    """Register rq's EP implementations with transformers (idempotent)."""
    tep = _tep()
    if EP_IMPLEMENTATION in tep.EPImplementationInterface._global_mapping:
        return
    replica, counting = _make_implementations()
    tep.EPImplementationInterface.register(EP_IMPLEMENTATION, replica)
    tep.EPImplementationInterface.register(COUNTING_IMPLEMENTATION, counting)


def ep_counters(model) -> dict[int, list[dict]]:
    """This rank's counters, ``{layer: [per step {"pairs", "expert_s", "layer_s", "sent"}]}``:
    pairs its experts received, seconds in its expert compute and in the whole layer, pairs it
    sent to each rank. Steps are forwards since loading (or since :func:`reset_counters`)."""
    out = {}
    for name, module in model.named_modules():
        impl = getattr(module, "_rq_ep", None)
        if impl is not None:
            m = _LAYER.search(name + ".")
            out[int(m.group(1)) if m else len(out)] = impl.stats
    return out


def reset_counters(model) -> None:
    for module in model.modules():
        impl = getattr(module, "_rq_ep", None)
        if impl is not None:
            impl.stats.clear()


@dataclass
class ExpertParallel:
    """One rank's share of an expert-parallel rewritten model (built by :meth:`setup`)."""

    config: object  # transformers DistributedConfig
    mesh_manager: object
    rank: int
    size: int

    @classmethod
    def setup(cls, rmap: RoutingMap, ep_size: int | None, distributed_config, where: str) -> "ExpertParallel":
        """Check the placement against the EP size, then start the process group and meshes
        (transformers' ``prepare_distribute_model``). Raises RQError on a mismatch."""
        from transformers import PreTrainedModel
        from transformers.distributed import DistributedConfig

        world = int(os.environ.get("WORLD_SIZE", "0"))
        if isinstance(distributed_config, dict):
            distributed_config = DistributedConfig.from_dict(distributed_config)
        G = distributed_config.ep_size if distributed_config is not None else ep_size
        if ep_size is not None and G != ep_size:
            raise RQError(f"ep_size={ep_size} disagrees with distributed_config.ep_size={G}")
        if rmap.num_devices is None:
            raise RQError(f"{where}: the routing map has no device placement, so it cannot run expert-parallel",
                          hint=f"rewrite with a placement for {G} devices (rq rewrite --ep-size {G})")
        if rmap.num_devices != G:
            raise RQError(f"{where}: the routing map places slots on {rmap.num_devices} devices but ep_size is {G}",
                          hint=f"run with ep_size={rmap.num_devices}, or rewrite with --ep-size {G}")
        if G < 2:
            raise RQError(f"ep_size must be at least 2 for expert parallelism, got {G}")
        if distributed_config is None:
            if world < G or world % G:
                raise RQError(f"{where}: ep_size={G} needs {G} processes (or a multiple), this run has "
                              f"WORLD_SIZE={world or 'unset'}", hint=f"launch with torchrun --nproc-per-node {G}")
            distributed_config = DistributedConfig(ep_size=G, fsdp_size=world, ep_implementation=EP_IMPLEMENTATION)
        if distributed_config.tp_size != 1 or distributed_config.pp_size != 1:
            raise RQError("rq expert parallelism runs with tp_size=1 and pp_size=1 (ranks holding distinct batches)")
        need = distributed_config.fsdp_size * distributed_config.dp_replicate_size
        if world != need:
            raise RQError(f"{where}: ep_size={G} with fsdp_size={distributed_config.fsdp_size} needs {need} processes, "
                          f"this run has WORLD_SIZE={world or 'unset'}", hint=f"launch with torchrun --nproc-per-node {need}")
        if distributed_config.ep_implementation == "auto":
            distributed_config.ep_implementation = EP_IMPLEMENTATION
        if distributed_config.ep_implementation != EP_IMPLEMENTATION:
            raise RQError(f"a rewritten model runs with ep_implementation={EP_IMPLEMENTATION!r}, "
                          f"not {distributed_config.ep_implementation!r}")
        register()
        distributed_config, _, mesh_manager = PreTrainedModel.prepare_distribute_model(distributed_config)
        rank = mesh_manager.get_mesh("ep").get_local_rank()
        return cls(distributed_config, mesh_manager, rank, G)

    def slots(self, layer_map: LayerMap) -> torch.Tensor:
        """``[P_rank]`` the global ids of the layer's slots this rank materialises (increasing)."""
        return (layer_map.slot_device == self.rank).nonzero().flatten()

    def distribute(self, model) -> None:
        """Plan every RQExperts module with ``ep_dispatch_experts`` and apply transformers' EP and FSDP."""
        from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

        names = sorted({replace_layer_number_by_wildcard(n) for n, m in model.named_modules() if isinstance(m, RQExperts)})
        model.ep_plan = dict.fromkeys(names, "ep_dispatch_experts")
        # transformers shards an untied model and ties it after loading (FSDP2 refuses one parameter in two groups)
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for target in tied:
            owner, _, leaf = target.rpartition(".")
            module = model.get_submodule(owner)
            setattr(module, leaf, torch.nn.Parameter(getattr(module, leaf).data, requires_grad=False))
        type(model).maybe_distribute_model(model, self.config, self.mesh_manager)
        if tied:
            model.tie_weights(recompute_mapping=False)


def local_expert_bytes(model) -> int:
    """Bytes of the expert parameters this rank holds (its materialised slots)."""
    total = 0
    for m in model.modules():
        if isinstance(m, RQExperts):
            for p in m.parameters(recurse=False):
                local = p.to_local() if hasattr(p, "to_local") else p
                total += local.numel() * local.element_size()
    return total


__all__ = ["COUNTING_IMPLEMENTATION", "EP_IMPLEMENTATION", "ExpertParallel", "ep_counters",
           "local_expert_bytes", "register", "reset_counters"]
