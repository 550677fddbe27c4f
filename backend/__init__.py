"""Model execution: loading the shared base model, multi-adapter LoRA, losses, sampling."""

from backend.hf_backend import AdamParams, HFBackend
from backend.model.loading import LoadedModel, load_base_model
from backend.sample.sampling import SamplingParams
from backend.train.fused_pass import FwdBwdRequest


def load_backend(config, data_dir=None) -> HFBackend:
    """Load the base model on the thread that will run all model work, and the backend on it.

    On CPU that is one compute thread, from the very start: once a second thread has run
    torch's OpenMP parallel regions (even just while loading), libgomp sees more threads than
    cores and every op slows down (a decode step of 8 rows took 2x as long). That thread uses
    ``config.torch_threads`` of torch's intra-op threads (``backend.compute.plan``)."""
    from backend.compute_thread import ComputeThread, InlineRunner, cgroup_cpu_limit, plan_threads
    from backend.model.loading import pick_device
    from thinker.core.config import parse_cpu_list

    on_cpu = pick_device(config.device).type == "cpu"
    pin = parse_cpu_list(config.compute_cpus) if on_cpu else ()  # (a GPU's worker threads are not pinned)
    plan = plan_threads(config.torch_threads, pin=pin, cpu_limit=cgroup_cpu_limit())
    compute = ComputeThread(plan=plan) if on_cpu else InlineRunner(plan)
    loaded = compute.run(load_base_model, config)
    if getattr(compute, "tuner", None) is not None:
        compute.tuner.watch(loaded.model)  # readings inside forward passes too (thread_tuner.py)
    data_dir = data_dir if data_dir is not None else config.thinker_data_dir
    return HFBackend(loaded, data_dir, compute=compute, max_resident_adapters=config.max_resident_adapters)


__all__ = [
    "AdamParams",
    "FwdBwdRequest",
    "HFBackend",
    "LoadedModel",
    "SamplingParams",
    "load_backend",
    "load_base_model",
]
