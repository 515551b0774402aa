"""Scale-out: expert parallelism (all-to-all) composed with data parallelism.

Typical use in a trainer (see ``docs/scaling.md``)::

    layout = parallel.setup(expert_parallel=P)           # torchrun env; single process without it
    parallel.check_consistent(config_dict, layout)
    model = parallel.parallelize(create_model(...), layout)
    optimizer = torch.optim.AdamW(model.parameters(), ...)
    for step, (images, labels) in ...:                    # this rank's contiguous slice
        with rng.positional_rng(rng.mix_seed(seed, step), layout.image_offset(global_batch)):
            logits, aux = model(images)
        (loss + aux["aux_loss"]).backward()
        parallel.sync_gradients(model, layout)
        parallel.clip_grad_norm_(model, 1.0, layout)   # global norm (optional)
        optimizer.step(); optimizer.zero_grad()
    state = parallel.full_state_dict(model, layout)     # collective; save on rank 0
    parallel.shutdown(layout)
"""

from vmoe.parallel.comm import AllToAllExpertComm, all_to_all
from vmoe.parallel.layout import (
    Layout,
    all_reduce_mean,
    barrier,
    check_consistent,
    setup,
    shutdown,
    single_process,
)
from vmoe.parallel.sharding import (
    clip_grad_norm_,
    expert_parameter_names,
    full_optimizer_state_dict,
    full_state_dict,
    full_tensors,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    parallelize,
    sync_gradients,
)

__all__ = [
    "AllToAllExpertComm",
    "Layout",
    "all_reduce_mean",
    "all_to_all",
    "barrier",
    "check_consistent",
    "clip_grad_norm_",
    "expert_parameter_names",
    "full_optimizer_state_dict",
    "full_state_dict",
    "full_tensors",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "parallelize",
    "setup",
    "shutdown",
    "single_process",
    "sync_gradients",
]
