"""pissa_fast on torch.distributed: PiSSA init of sharded weights (FSDP2 / tensor-parallel DTensors,
DeepSpeed ZeRO-3 parameters) inside training, and the building blocks of multi-rank runs.

    pissa_fast.decompose_many({name: p.detach() for ...}, r=16, inplace=True)   # DTensors: routed here
    weight_seed(seed, name)          # per-weight seed, the same in every process and run
    weight_seeds(seed, weights)      # {key: weight_seed(seed, key)}: decompose_many's per-name seeds
    assign_by_bytes(sizes, world)    # owner rank of each item, balanced by bytes
    launch.init()                    # torchrun's rank / device (cuda:LOCAL_RANK + NCCL, else CPU + gloo)
    with team.join() as t: t.step("what", fn)   # steps that fail on every rank when one fails, no hangs
Everything but decompose_sharded is pure Python (importable without the compiled library).
"""
from .assign import assign_by_bytes, rounds
from .consensus import RankFailedError, raise_if_any_failed
from .launch import Launch, comm_device, device_and_backend, from_env, init
from ..errors import NativeLibraryMissing
from .seeding import seed_for, weight_seed, weight_seeds
from .shards import full_shape, is_dtensor, is_sharded, is_zero3, local_tensor
from .team import Team, join

try:
    from .sharded import decompose_sharded
except NativeLibraryMissing as _missing:  # the pure-Python blocks above still work (e.g. for the CLI's --help)
    __getattr__ = _missing.module_getattr(__name__, ("decompose_sharded",))

__all__ = [
    "Launch", "RankFailedError", "assign_by_bytes", "comm_device", "decompose_sharded", "device_and_backend",
    "from_env", "full_shape", "init", "is_dtensor", "is_sharded", "is_zero3", "local_tensor",
    "raise_if_any_failed", "rounds", "seed_for", "Team", "join", "weight_seed", "weight_seeds",
]
