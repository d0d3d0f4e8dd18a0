#!/usr/bin/env python
"""CPU benchmark (not a test): meta-training speed, optimizer step time and peak memory, optionally
side by side with google/learned_optimization (JAX).

Ouroboros side (always runs; one fresh subprocess per measurement):

* **meta-training**: seconds per outer step of :class:`meta.trainer.MetaTrainer` on the default preset's
  meta settings (``train.py presets``: truncated backprop, population 8, truncation 20, horizon 200,
  Adam 3e-3 with the +-3 meta-gradient clip, the default LO 32x2), one process, at
  ``torch.set_num_threads(T)`` for each ``--threads`` T, on two workloads:
  ``default`` (the ``digits_mlp`` distribution: MLPs of varying width, depth, activation, batch size)
  and ``same32`` (8 identical-shape tasks: MLP 64-32-32-10, ReLU, batch ``--same-batch``, on the same
  embedded 8x8 digits; registered at run time as distribution ``bench_digits_mlp_32x32``).
  ``--warmup`` outer steps untimed, then ``--repeats`` blocks of ``--outer-steps`` steps; the median
  block is reported. ``--procs 1,2`` adds, for every ``--threads`` T of at least 2, the same
  workload on T one-thread processes (``torch.distributed.run``, gloo; the members are sharded over
  the processes and the meta-gradient all-reduced, as ``python train.py`` runs it by default), against
  the same T-thread JAX run: how this project uses T cores, where a second intra-op thread slows its
  small-tensor ops down.
* **optimizer step**: one step, no autograd, on ``--sizes`` parameters (square matrices plus a bias
  vector each, the same shapes on both sides; see :func:`shapes_for`): the Ouroboros learned optimizer
  (``BoundLearnedOptimizer.update``, functional, PyTorch path), the functional ``optimizers.hand.Adam``,
  ``torch.optim.Adam(foreach=True)`` and ``torch.optim.Adam(fused=True)``; median over ``--step-repeats``
  steps after ``--step-warmup``, at ``--step-threads`` threads (default 1).
* **peak memory** of one step: a fresh subprocess per (method, size) allocates params, grads and the
  optimizer state (torch.optim.Adam's state is pre-filled so it is not counted as the step's),
  compiles where there is something to compile, runs one untimed step (lazy initialisation; its freed
  buffers go back to the OS, see below), then resets the kernel's peak-RSS counter
  (``/proc/self/clear_refs``), reads VmRSS as the baseline, runs one step and reports
  ``VmHWM - baseline`` (the step's extra resident memory, its outputs included: a functional step
  returns new params and state). Every memory worker (only those: on timed runs it would charge every
  large temporary fresh pages, which a user's process does not pay) runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so large
  buffers are mmapped and returned to the OS when freed (glibc's dynamic threshold would otherwise
  keep a warm-up's buffers in the heap and hide the step's). Where ``clear_refs`` cannot be written it
  falls back to ``ru_maxrss`` minus the baseline (then an upper bound on nothing: noted in the JSON).

JAX side (``--jax``; optional): the same measurements with learned_optimization's own trainer,
``VectorizedLOptTruncatedStep`` + ``TruncatedGrad`` + ``AdafacMLPLOpt(hidden_size=32, hidden_layers=2)``
under ``SingleMachineGradientLearner`` with ``GradientClipOptimizer(Adam(3e-3), 3.0)``, constant
truncation schedule 200, unroll 20 (one jit of 20 steps), ``random_initial_iteration_offset=200`` (its
way to de-synchronise the members), meta-loss = the inner training loss. Tasks are a small custom
learned_optimization task (plain-JAX MLP, :func:`_jax_task_family`) fed Ouroboros' embedded 8x8 digits
as numpy arrays (``tasks.data.get_dataset('digits')``, exported by the parent process), batches drawn on
the host as learned_optimization does. ``same32``: 8 tasks vmapped by one estimator. ``default``: the
first episode's task of each of Ouroboros' 8 members (same configs) as 8 estimators of 1 task each
(vmap needs identical shapes; learned_optimization mixes task shapes with a list of estimators); their
tasks do not change at episode ends, Ouroboros' do. The LO step runs ``jax.jit(opt.update)`` (no
buffer donation, like the functional Ouroboros step). JAX threads: each worker is pinned to T CPUs
(``sched_setaffinity``; T=1 also turns off XLA's multi-threaded Eigen); the torch workers are pinned
the same way. learned_optimization's trainer compiles its unroll on each of the first two outer steps (the second with
different input types): at least 2 warm-up steps there, their time reported apart.

It needs ``jax`` and a learned_optimization checkout whose TensorFlow imports are optional
(``bench/learned_optimization_notf.patch``; see bench/README_cpu_speed.md). The JAX interpreter is
``--jax-python`` (default: this one if it imports jax, else ``$OUROBOROS_JAX_PYTHON`` or
``/work/jaxenv/bin/python``), the checkout ``--lo-path`` (default ``$LEARNED_OPTIMIZATION_PATH`` or
``/work/lo_checkout``). If either is missing the JAX columns say why and the rest still runs.

    python bench/cpu_speed.py                     # the full Ouroboros measurement
    python bench/cpu_speed.py --jax               # ... and the JAX side, with ratios
    python bench/cpu_speed.py --smoke             # < 60 s sanity check, tiny sizes, temp output

Writes ``bench/results/cpu_speed.{md,json}`` (``--out PREFIX`` to change; ``--smoke`` writes to a
temporary directory unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JAX_PYTHON = "/work/jaxenv/bin/python"
DEFAULT_LO_PATH = "/work/lo_checkout"
SAME_DIST = "bench_digits_mlp_32x32"
STEP_HORIZON = 1000  # T for the fraction-of-training time features of both learned optimizers
TORCH_METHODS = ("ouroboros_lo", "ouroboros_adam", "torch_adam_foreach", "torch_adam_fused")
JAX_METHODS = ("lopt_adafac_mlp",)


# ================================================================================================
# helpers shared by parent and workers (no torch / jax at import time)
# ================================================================================================
def shapes_for(n: int) -> list[list[int]]:
    """About ``n`` parameters as a few large square matrices (w x w) each followed by a bias (w,):
    w = the power of two nearest below sqrt(n / 4) (8..2048), as many (matrix, bias) pairs as fit.
    1M: 15 x (256x256 + 256) = 986,880; 10M: 10 x (1024x1024 + 1024) = 10,496,000."""
    w = 2 ** int(math.floor(math.log2(max(math.sqrt(n / 4), 8))))
    w = max(8, min(w, 2048))
    m = max(1, round(n / (w * w + w)))
    return [s for _ in range(m) for s in ([w, w], [w])]


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def _read_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024  # kB -> bytes
    return out


class PeakRSS:
    """Peak resident memory of a region: reset the kernel's high-water mark, read the baseline."""

    def start(self) -> None:
        import gc
        import resource

        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (clear_refs not writable: peak since process start)"
        self.baseline = _read_status().get("VmRSS", 0)
        self._ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> dict:
        import resource

        st = _read_status()
        if self.method.startswith("VmHWM"):
            peak = st.get("VmHWM", 0)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"baseline_bytes": self.baseline, "peak_bytes": peak, "extra_bytes": max(0, peak - self.baseline),
                "rss_after_bytes": st.get("VmRSS", 0), "memory_method": self.method}


def pin_threads(threads: int) -> None:
    """Pin this process to ``threads`` CPUs (before importing jax / starting torch work)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:max(1, threads)])
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ================================================================================================
# Ouroboros (torch) workers
# ================================================================================================
def _torch_setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(True)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return torch


def register_same_distribution(batch: int) -> None:
    """8 identical-shape tasks: image_mlp on digits, hidden [32, 32], ReLU, fixed batch, init scale 1."""
    from tasks.base import TaskDistribution
    from tasks.distributions import DISTRIBUTIONS

    fam = {"dataset": "digits", "min_width": 32, "max_width": 32, "min_depth": 2, "max_depth": 2,
           "activations": ("relu",), "batch_sizes": (batch,), "init_scale": (1.0, 1.0)}
    DISTRIBUTIONS[SAME_DIST] = lambda seed=0: TaskDistribution(SAME_DIST, [("image_mlp", fam, 1.0)], seed=seed)


def default_run_config(workload: str, total_steps: int, same_batch: int, threads: int = 1):
    """The default preset's run config on 1 process, W&B off; ``same32`` swaps the distribution."""
    from dataclasses import replace

    import train
    from meta.config import apply_overrides

    cfg = train.presets()["default"]
    over = {"procs": 1, "wandb": "disabled", "meta.outer_steps": max(total_steps, 1)}
    if workload == "same32":
        register_same_distribution(same_batch)
        over["meta.distribution"] = SAME_DIST
    cfg = apply_overrides(cfg, over)
    return replace(cfg, threads=threads)  # informational: the worker sets torch's threads itself


def worker_torch_meta(spec: dict) -> dict:
    procs = int(spec.get("procs", 1))
    torch = _torch_setup(spec["threads"] // procs)
    from meta import distributed as D
    from meta.trainer import MetaTrainer

    if procs > 1:  # launched by torch.distributed.run: shard the members, all-reduce the meta-gradient
        D.init()

    warm, n, reps = spec["warmup"], spec["outer_steps"], spec["repeats"]
    cfg = default_run_config(spec["workload"], warm + n * reps, spec["same_batch"], spec["threads"])
    t0 = time.perf_counter()
    trainer = MetaTrainer(cfg)
    init_s = time.perf_counter() - t0
    step_times = []
    for _ in range(warm + n * reps):
        t = time.perf_counter()
        metrics = trainer.train_step()
        step_times.append(time.perf_counter() - t)
    blocks = [sum(step_times[warm + r * n: warm + (r + 1) * n]) / n for r in range(reps)]
    if procs > 1:
        D.barrier()
        if not D.is_main():
            D.shutdown()
            return {}
        D.shutdown()
    return {"side": "ouroboros", "workload": spec["workload"], "threads": spec["threads"], "procs": procs,
            "torch_threads": torch.get_num_threads(), "init_s": init_s,
            "warmup_step_s": step_times[:warm], "block_s_per_step": blocks,
            "s_per_step": statistics.median(blocks), "steps_per_s": 1.0 / statistics.median(blocks),
            "all_step_s": step_times, "meta_loss_last": metrics.get("meta_loss"),
            "config": {"population": cfg.meta.population, "truncation": cfg.meta.truncation,
                       "horizon": cfg.meta.horizon, "estimator": cfg.meta.estimator,
                       "distribution": cfg.meta.distribution, "meta_loss": cfg.meta.meta_loss}}


def _torch_problem(shapes, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = {f"t{i}": torch.randn(s, generator=gen) * 0.02 for i, s in enumerate(shapes)}
    grads = {k: torch.randn(p.shape, generator=gen) * 1e-2 for k, p in params.items()}
    return params, grads


def _torch_stepper(method: str, shapes):
    """``(step(), state_ready())``: ``step`` runs one optimizer step on fixed gradients."""
    import torch

    params, grads = _torch_problem(shapes)
    if method in ("ouroboros_lo", "ouroboros_adam"):
        if method == "ouroboros_lo":
            from optimizers.learned import LearnedOptimizer

            lo = LearnedOptimizer()
            opt = lo.bind(lo.init_theta(0), kernels=False)
            state = opt.init(params, total_steps=STEP_HORIZON)
        else:
            from optimizers.hand import Adam

            opt = Adam(lr=1e-3)
            state = opt.init(params)
        box = {"params": params, "state": state}

        def step():
            with torch.no_grad():
                box["params"], box["state"] = opt.update(grads, box["state"], box["params"])
            return box

        return step
    ps = [torch.nn.Parameter(p) for p in params.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = g
    kw = {"foreach": True} if method == "torch_adam_foreach" else {"fused": True}
    opt = torch.optim.Adam(ps, lr=1e-3, **kw)
    for p in ps:  # pre-fill the state so a step's memory is the step's, not the state's allocation
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p)}

    def step():
        opt.step()
        return opt

    return step


def worker_torch_step(spec: dict) -> dict:
    torch = _torch_setup(spec["threads"])
    shapes = spec["shapes"]
    step = _torch_stepper(spec["method"], shapes)
    out = {"side": "ouroboros", "method": spec["method"], "numel": numel(shapes), "threads": spec["threads"]}
    if spec["mode"] == "memory":
        step()  # one untimed step first: lazy initialisation (thread pools, dispatch) is not the step's
        meter = PeakRSS()
        meter.start()
        outputs = step()  # the outputs stay alive until measured
        out.update(meter.stop())
        del outputs
        return out
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    out.update(step_s=statistics.median(times), all_step_s=times, torch_threads=torch.get_num_threads())
    return out


# ================================================================================================
# learned_optimization (JAX) workers: no torch here (the JAX environment need not have it)
# ================================================================================================
def _jax_setup(spec: dict):
    if spec["threads"] == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # "Oryx not found", "Tensorflow library not found"
    if spec.get("lo_path") and spec["lo_path"] not in sys.path:
        sys.path.insert(0, spec["lo_path"])
    import jax

    return jax


def worker_jax_probe(spec: dict) -> dict:
    jax = _jax_setup({**spec, "threads": 2})
    import learned_optimization  # noqa: F401
    from learned_optimization.learned_optimizers import adafac_mlp_lopt  # noqa: F401
    from learned_optimization.outer_trainers import lopt_truncated_step, truncated_grad  # noqa: F401

    import jaxlib

    return {"jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?"),
            "learned_optimization": os.path.dirname(learned_optimization.__file__)}




def _jax_task_family(data: dict, hidden: list[int], activation: str, batch: int, init_scale: float, seed: int):
    """A learned_optimization TaskFamily: MLP classifier on the given digits arrays (numpy), the same
    maths as Ouroboros' ``image_mlp`` task (N(0, init_scale^2 / fan_in) weights, zero biases,
    softmax cross-entropy). One fixed config: ``sample`` returns a dummy task parameter."""
    import jax
    import jax.numpy as jnp
    import numpy as onp
    from learned_optimization.tasks import base as tasks_base
    from learned_optimization.tasks.datasets import base as datasets_base

    x_tr, y_tr = data["x_train"].reshape(len(data["x_train"]), -1).astype("float32"), data["y_train"].astype("int32")
    x_va, y_va = data["x_valid"].reshape(len(data["x_valid"]), -1).astype("float32"), data["y_valid"].astype("int32")
    sizes = [x_tr.shape[1], *hidden, int(data["num_classes"])]
    act = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": lambda h: jax.nn.gelu(h, approximate=False),
           "silu": jax.nn.silu}[activation]  # exact gelu, as torch.nn.functional.gelu

    def batches(x, y, salt):
        rng = onp.random.default_rng(seed * 1000 + salt)
        while True:
            idx = rng.integers(0, len(x), batch)
            yield {"image": x[idx], "label": y[idx]}

    ds = datasets_base.Datasets(train=batches(x_tr, y_tr, 0), inner_valid=batches(x_va, y_va, 1),
                                outer_valid=batches(x_va, y_va, 2), test=batches(x_va, y_va, 3))

    class DigitsMLP(tasks_base.Task):
        datasets = ds

        def init(self, key):
            keys = jax.random.split(key, len(sizes) - 1)
            p = {}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
                p[f"l{i}.w"] = jax.random.normal(keys[i], (a, b)) * (init_scale / math.sqrt(a))
                p[f"l{i}.b"] = jnp.zeros((b,))
            return p

        def loss(self, params, key, data):
            h = data["image"]
            n = len(sizes) - 1
            for i in range(n):
                h = h @ params[f"l{i}.w"] + params[f"l{i}.b"]
                if i < n - 1:
                    h = act(h)
            logp = jax.nn.log_softmax(h)
            return -jnp.mean(jnp.take_along_axis(logp, data["label"][:, None], axis=1))

    task = DigitsMLP()

    class DigitsMLPFamily(tasks_base.TaskFamily):
        datasets = ds

        def sample(self, key):
            return jnp.zeros([])

        def task_fn(self, cfg):
            return task

    return DigitsMLPFamily()


def worker_jax_meta(spec: dict) -> dict:
    jax = _jax_setup(spec)
    import numpy as onp
    from learned_optimization.learned_optimizers import adafac_mlp_lopt
    from learned_optimization.optimizers import base as opt_base
    from learned_optimization.optimizers import optax_opts
    from learned_optimization.outer_trainers import (gradient_learner, lopt_truncated_step, truncated_grad,
                                                     truncation_schedule)

    data = dict(onp.load(spec["data"]))
    m = spec["meta"]
    lopt = adafac_mlp_lopt.AdafacMLPLOpt(hidden_size=32, hidden_layers=2)
    sched = truncation_schedule.ConstantTruncationSchedule(m["horizon"])
    if spec["workload"] == "same32":  # one estimator, population vmapped
        groups = [(_jax_task_family(data, [32, 32], "relu", spec["same_batch"], 1.0, 0), m["population"])]
    else:  # Ouroboros' members' first-episode tasks, one estimator (of one task) each
        groups = [(_jax_task_family(data, c["hidden"], c["activation"], int(c["batch_size"]),
                                    float(c["init_scale"]), i), 1) for i, c in enumerate(spec["task_configs"])]
    estimators = []
    for fam, n_tasks in groups:
        step = lopt_truncated_step.VectorizedLOptTruncatedStep(
            fam, lopt, sched, num_tasks=n_tasks, random_initial_iteration_offset=m["horizon"])
        estimators.append(truncated_grad.TruncatedGrad(step, unroll_length=m["truncation"],
                                                       steps_per_jit=m["truncation"]))
    theta_opt = opt_base.GradientClipOptimizer(optax_opts.Adam(m["outer_lr"]), m["grad_clip"])
    learner = gradient_learner.SingleMachineGradientLearner(lopt, estimators, theta_opt)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    state = learner.init(key)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    warm, n, reps = spec["warmup"], spec["outer_steps"], spec["repeats"]
    step_times = []
    loss = None
    w = max(warm, 2)  # learned_optimization compiles its unroll twice (steps 1 and 2): never timed
    for i in range(w + n * reps):
        key, sub = jax.random.split(key)
        t = time.perf_counter()
        state, loss, _ = learner.update(state, sub, with_metrics=False)
        jax.block_until_ready((state, loss))
        step_times.append(time.perf_counter() - t)
    blocks = [sum(step_times[w + r * n: w + (r + 1) * n]) / n for r in range(reps)]
    timed = step_times[w:]
    return {"side": "jax", "workload": spec["workload"], "threads": spec["threads"], "init_s": init_s,
            "first_step_s": step_times[0], "compile_steps_s": sum(step_times[:2]), "warmup_step_s": step_times[:w],
            "max_timed_step_over_median": max(timed) / statistics.median(timed),  # >> 1: a recompile "block_s_per_step": blocks,
            "s_per_step": statistics.median(blocks), "steps_per_s": 1.0 / statistics.median(blocks),
            "all_step_s": step_times, "meta_loss_last": float(loss), "estimators": len(estimators),
            "tasks_per_estimator": [g[1] for g in groups]}


def worker_jax_step(spec: dict) -> dict:
    jax = _jax_setup(spec)
    import jax.numpy as jnp
    from learned_optimization.learned_optimizers import adafac_mlp_lopt

    shapes = spec["shapes"]
    key = jax.random.PRNGKey(0)
    keys = jax.random.split(key, 2 * len(shapes) + 1)
    params = {f"t{i}": jax.random.normal(keys[2 * i], tuple(s)) * 0.02 for i, s in enumerate(shapes)}
    grads = {f"t{i}": jax.random.normal(keys[2 * i + 1], tuple(s)) * 1e-2 for i, s in enumerate(shapes)}
    lopt = adafac_mlp_lopt.AdafacMLPLOpt(hidden_size=32, hidden_layers=2)
    opt = lopt.opt_fn(lopt.init(keys[-1]))
    state = opt.init(params, num_steps=STEP_HORIZON)
    loss = jnp.asarray(1.0, jnp.float32)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda s, g, l: opt.update(s, g, loss=l)).lower(state, grads, loss).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready((params, grads, state))
    out = {"side": "jax", "method": spec["method"], "numel": numel(shapes), "threads": spec["threads"],
           "compile_s": compile_s}
    if spec["mode"] == "memory":
        state = jax.block_until_ready(compiled(state, grads, loss))  # one untimed step first, as torch
        meter = PeakRSS()
        meter.start()
        new = compiled(state, grads, loss)
        jax.block_until_ready(new)
        out.update(meter.stop())
        return out
    for _ in range(spec["warmup"]):
        state = jax.block_until_ready(compiled(state, grads, loss))
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        state = jax.block_until_ready(compiled(state, grads, loss))
        times.append(time.perf_counter() - t)
    out.update(step_s=statistics.median(times), all_step_s=times)
    return out


WORKERS = {"torch_meta": worker_torch_meta, "torch_step": worker_torch_step, "jax_probe": worker_jax_probe,
           "jax_meta": worker_jax_meta, "jax_step": worker_jax_step}


def worker_main(spec: dict) -> None:
    pin_threads(spec.get("threads", 1))
    result = WORKERS[spec["kind"]](spec)
    if result:  # ranks other than 0 of a multi-process worker report nothing
        emit(result)


# ================================================================================================
# parent: orchestration, machine description, report
# ================================================================================================
# glibc settings that keep large freed buffers in the heap instead of returning them to the OS (mmap
# threshold at its 64-bit maximum, no trimming): a step that allocates large temporaries then reuses
# their pages instead of faulting fresh ones every step (measured at 1M parameters: 0.40 s -> 0.24 s,
# system time 0.76 s -> 0 over 5 steps). Same effect as running under jemalloc / tcmalloc.
HEAP_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296",
               "MALLOC_TOP_PAD_": "268435456"}


def run_worker(python: str, spec: dict, timeout: float, extra_env: dict | None = None) -> dict:
    # the mmap threshold only where peak memory is measured: on timed runs it turns every large
    # temporary into fresh pages (an mmap, page faults, an munmap per buffer and step), a cost a user's
    # process does not pay (measured: the 1M-parameter learned step 682 ms with it, see the README)
    mem_env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if spec.get("mode") == "memory" else {}
    procs = int(spec.get("procs", 1))
    env = {**os.environ, **mem_env, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(spec.get("threads", 1) // procs), **(extra_env or {})}
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run([python, *launcher, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)}
    out = json.loads(lines[-1][len("RESULT "):])
    out["worker_wall_s"] = time.perf_counter() - t0
    return out


def machine_description() -> dict:
    model, mhz = None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    except OSError:  # pragma: no cover
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover
        pass
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count()
    return {"cpu_model": model or platform.processor() or "unknown", "cpu_mhz": mhz, "cores": cores,
            "memory_gib": mem, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average_before": list(os.getloadavg())}


def export_digits(path: Path) -> None:
    """Ouroboros' embedded 8x8 digits (the standardised train / valid split its tasks use) as numpy."""
    import numpy as np

    from tasks.data import get_dataset

    d = get_dataset("digits")
    np.savez(path, x_train=d.x_train.numpy(), y_train=d.y_train.numpy(), x_valid=d.x_valid.numpy(),
             y_valid=d.y_valid.numpy(), num_classes=d.num_classes)


def member_task_configs() -> list[dict]:
    """The first-episode task configs of the default preset's members (what Ouroboros' meta-training
    starts on), for the JAX ``default`` workload."""
    import train
    from meta.trainer import make_estimator
    from optimizers.learned import LearnedOptimizer
    from tasks import get_distribution

    cfg = train.presets()["default"]
    est = make_estimator(cfg.meta, LearnedOptimizer(cfg.lo), get_distribution(cfg.meta.distribution,
                                                                              cfg.meta.dist_seed))
    return [est.dist.config(est.split, est.task_index(i, 0)) for i in range(cfg.meta.population)]


def find_jax_python(arg: str | None) -> str:
    if arg:
        return arg
    try:
        import jax  # noqa: F401

        return sys.executable
    except ImportError:
        return os.environ.get("OUROBOROS_JAX_PYTHON", DEFAULT_JAX_PYTHON)


def _ms(s):
    return "-" if s is None else f"{1e3 * s:.2f}"


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"


def _ratio(a, b, fmt="{:.2f}"):
    return "-" if a is None or b is None or b == 0 else fmt.format(a / b)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# CPU speed: Ouroboros" + (" vs learned_optimization (JAX)" if report["jax"]["requested"] else ""), ""]
    lines.append(f"Machine: **{m['cpu_model']}**, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}; "
                 f"Python {m['python']}, torch {m['torch']}"
                 + (f", jax {report['jax']['versions'].get('jax')}" if report["jax"].get("versions") else "")
                 + f". Load average before {m['load_average_before']}, after {m.get('load_average_after')}. "
                 f"{report['time']}. Command: `{report['command']}`.")
    malloc = report["args"].get("malloc", "default")
    lines += ["", "Timed workers (both sides) ran with glibc malloc settings: " + (
        "the defaults." if malloc == "default" else " ".join(f"`{k}={v}`" for k, v in HEAP_MALLOC.items())
        + " (large freed buffers stay in the heap).")]
    lines.append("")
    if report["jax"]["requested"] and not report["jax"].get("available"):
        lines += [f"JAX side not run: {report['jax'].get('reason')}", ""]
    a = report["args"]
    lines += ["## Meta-training (seconds per outer step)", "",
              f"Truncated backprop, 8 tasks, truncation 20, horizon 200, one process unless the row says otherwise; {a['warmup']} warm-up "
              f"step(s), then the median of {a['repeats']} block(s) of {a['outer_steps']} steps. "
              "Ratio = JAX time / Ouroboros time (> 1: Ouroboros is faster). learned_optimization compiles its "
              "unroll on each of its first two steps: those are untimed and reported apart.", "",
              "| workload | threads | Ouroboros s/step | Ouroboros steps/s | JAX s/step | JAX steps/s | "
              "JAX / Ouroboros time | JAX first 2 steps (compile) s |",
              "|---|---|---|---|---|---|---|---|"]
    for row in report["meta"]:
        j = row.get("jax") or {}
        js = j.get("s_per_step")
        layouts = [(str(row["threads"]), row["ouroboros"])]
        layouts += [(f"{row['threads']} (Ouroboros: {p} processes x {row['threads'] // int(p)} thread)", o)
                    for p, o in (row.get("ouroboros_procs") or {}).items()]
        for label, o in layouts:
            os_ = o.get("s_per_step")
            lines.append(f"| {row['workload']} | {label} | {os_ and f'{os_:.3f}' or o.get('error', '-')} | "
                         f"{os_ and f'{1 / os_:.2f}' or '-'} | {js and f'{js:.3f}' or j.get('error', '-')} | "
                         f"{js and f'{1 / js:.2f}' or '-'} | {_ratio(js, os_)} | "
                         f"{j.get('compile_steps_s') and '%.1f' % j['compile_steps_s'] or '-'} |")
    lines += ["", "Workloads: `default` = the default preset's `digits_mlp` tasks (varying width, depth, "
              "activation, batch size; the JAX side runs the same 8 first-episode tasks as 8 one-task "
              f"estimators); `same32` = 8 identical MLPs 64-32-32-10, ReLU, batch {a['same_batch']} (JAX: one "
              "estimator, 8 tasks vmapped).", "",
              f"## Optimizer step ({a['step_threads']} thread(s))", "",
              f"Median of {a['step_repeats']} steps after {a['step_warmup']} warm-up; peak extra memory = one "
              "step's peak RSS above the RSS with params, grads and state allocated (fresh process per cell).",
              "", "| parameters | method | step ms | vs Ouroboros LO (time) | peak extra MiB | vs Ouroboros LO "
              "(memory) |", "|---|---|---|---|---|---|"]
    for size in report["steps"]:
        base = size["methods"].get("ouroboros_lo", {})
        for name, r in size["methods"].items():
            lines.append(f"| {size['numel']:,} | {name} | {_ms(r.get('step_s')) if 'step_s' in r else r.get('error', '-')}"
                         f" | {_ratio(r.get('step_s'), base.get('step_s'))} | "
                         f"{_mib(r.get('extra_bytes')) if 'extra_bytes' in r else r.get('memory_error', '-')} | "
                         f"{_ratio(r.get('extra_bytes'), base.get('extra_bytes'))} |")
    lines += ["", "`ouroboros_lo`: `BoundLearnedOptimizer.update` (functional, PyTorch path, no autograd); "
              "`ouroboros_adam`: functional `optimizers.hand.Adam`; `torch_adam_*`: `torch.optim.Adam` "
              "in place; `lopt_adafac_mlp`: learned_optimization's `AdafacMLPLOpt(32, 2)` update under "
              "`jax.jit` (compiled first). Functional steps return new params and state, which counts in "
              "their memory.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny sanity run (< 60 s): sizes 1e4, 1 outer step, 1 thread")
    ap.add_argument("--jax", action="store_true", help="also run learned_optimization (JAX) and report ratios")
    ap.add_argument("--jax-python", default=None, help="interpreter with jax (default: see module doc)")
    ap.add_argument("--lo-path", default=os.environ.get("LEARNED_OPTIMIZATION_PATH", DEFAULT_LO_PATH),
                    help="learned_optimization checkout (TensorFlow-optional)")
    ap.add_argument("--threads", default="1,2", help="meta-training thread counts")
    ap.add_argument("--procs", default="1",
                    help="Ouroboros meta-training layouts: for each P > 1 here and each --threads T >= P "
                         "divisible by P, also P processes of T/P threads (against the same T-thread JAX run)")
    ap.add_argument("--workloads", default="default,same32", help="meta-training workloads")
    ap.add_argument("--outer-steps", type=int, default=20, help="timed outer steps per block")
    ap.add_argument("--warmup", type=int, default=3, help="untimed outer steps first")
    ap.add_argument("--repeats", type=int, default=3, help="timed blocks (median reported)")
    ap.add_argument("--same-batch", type=int, default=128, help="batch size of the same32 tasks")
    ap.add_argument("--sizes", default="1e6,1e7", help="parameter counts of the optimizer-step measurement")
    ap.add_argument("--step-threads", type=int, default=1)
    ap.add_argument("--step-warmup", type=int, default=3)
    ap.add_argument("--step-repeats", type=int, default=20)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-meta", action="store_true", help="skip meta-training")
    ap.add_argument("--no-steps", action="store_true", help="skip the optimizer-step measurement")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker subprocess")
    ap.add_argument("--out", default=None, help="output prefix (default bench/results/cpu_speed)")
    ap.add_argument("--malloc", choices=("default", "heap"), default="default",
                    help="glibc malloc settings of the timed workers, both sides: 'default' (what a process "
                         "gets), 'heap' (large buffers kept in the heap: %s)" % " ".join(
                             f"{k}={v}" for k, v in HEAP_MALLOC.items()))
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.smoke:
        args.sizes, args.outer_steps, args.warmup, args.repeats = "1e4", 1, 0, 1
        args.step_warmup, args.step_repeats, args.threads = 1, 3, "1"
        args.timeout = min(args.timeout, 120)
        if args.jax:  # the JAX default workload compiles 8 estimators: too slow for a smoke run
            args.workloads = "same32"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    timed_env = dict(HEAP_MALLOC) if args.malloc == "heap" else {}  # --malloc: the timed workers only
    sizes = [int(float(x)) for x in args.sizes.split(",") if x.strip()]
    threads = [int(x) for x in args.threads.split(",") if x.strip()]
    procs = sorted({int(x) for x in args.procs.split(",") if x.strip()} | {1})
    workloads = [x.strip() for x in args.workloads.split(",") if x.strip()]
    for w in workloads:
        if w not in ("default", "same32"):
            ap.error(f"unknown workload {w!r}: use default, same32")
    t_start = time.perf_counter()
    machine = machine_description()
    tmp = Path(tempfile.mkdtemp(prefix="cpu_speed_"))
    jax_info: dict = {"requested": args.jax}
    jax_python = None
    if args.jax:
        jax_python = find_jax_python(args.jax_python)
        if not Path(jax_python).exists() and jax_python != sys.executable:
            jax_info.update(available=False, reason=f"no JAX interpreter at {jax_python} (--jax-python)")
        else:
            probe = run_worker(jax_python, {"kind": "jax_probe", "lo_path": args.lo_path, "threads": 2}, 300)
            if "error" in probe:
                jax_info.update(available=False, reason=f"jax / learned_optimization not importable with "
                                                        f"{jax_python} and --lo-path {args.lo_path}: {probe['error']}")
            else:
                jax_info.update(available=True, python=jax_python, lo_path=args.lo_path, versions=probe)
                try:
                    commit = subprocess.run(["git", "-C", args.lo_path, "log", "-1", "--format=%H %s"],
                                            capture_output=True, text=True, check=False).stdout.strip()
                    jax_info["lo_checkout_head"] = commit or None
                except OSError:
                    pass
        print(f"JAX side: {'available ' + json.dumps(jax_info.get('versions')) if jax_info.get('available') else jax_info['reason']}",
              flush=True)
    use_jax = bool(jax_info.get("available"))
    data_path = tmp / "digits.npz"
    task_configs = None
    if use_jax:
        export_digits(data_path)
        if "default" in workloads:
            task_configs = member_task_configs()
    common = {"warmup": args.warmup, "outer_steps": args.outer_steps, "repeats": args.repeats,
              "same_batch": args.same_batch}
    meta_rows = []
    if not args.no_meta:
        for wl in workloads:
            for t in threads:
                spec = {"kind": "torch_meta", "workload": wl, "threads": t, **common}
                ours = run_worker(sys.executable, spec, args.timeout, timed_env)
                row = {"workload": wl, "threads": t, "ouroboros": ours}
                for p in procs[1:]:
                    if t >= p and t % p == 0:
                        r = run_worker(sys.executable, {**spec, "procs": p}, args.timeout, timed_env)
                        row.setdefault("ouroboros_procs", {})[str(p)] = r
                        print(f"meta-training {wl} {p} processes x {t // p} thread(s): Ouroboros "
                              f"{r.get('s_per_step', r.get('error'))} s/step", flush=True)
                if use_jax:
                    jspec = {"kind": "jax_meta", "workload": wl, "threads": t, "lo_path": args.lo_path,
                             "data": str(data_path), "task_configs": task_configs, **common,
                             "meta": {"population": 8, "truncation": 20, "horizon": 200, "outer_lr": 3e-3,
                                      "grad_clip": 3.0}}
                    row["jax"] = run_worker(jax_python, jspec, args.timeout, timed_env)
                meta_rows.append(row)
                o, j = row["ouroboros"], row.get("jax", {})
                print(f"meta-training {wl} threads={t}: Ouroboros {o.get('s_per_step', o.get('error'))} s/step"
                      + (f", JAX {j.get('s_per_step', j.get('error'))} s/step" if use_jax else ""), flush=True)
    step_rows = []
    if not args.no_steps:
        for n in sizes:
            shapes = shapes_for(n)
            methods: dict[str, dict] = {}
            todo = [(m, sys.executable, "torch_step") for m in TORCH_METHODS]
            if use_jax:
                todo += [(m, jax_python, "jax_step") for m in JAX_METHODS]
            for name, py, kind in todo:
                spec = {"kind": kind, "method": name, "shapes": shapes, "threads": args.step_threads,
                        "warmup": args.step_warmup, "repeats": args.step_repeats, "lo_path": args.lo_path}
                r = run_worker(py, {**spec, "mode": "time"}, args.timeout, timed_env)
                if not args.no_memory:
                    mem = run_worker(py, {**spec, "mode": "memory"}, args.timeout)
                    if "error" in mem:
                        r["memory_error"] = mem["error"]
                    else:
                        r.update({k: mem[k] for k in ("baseline_bytes", "peak_bytes", "extra_bytes",
                                                      "memory_method")})
                methods[name] = r
                print(f"step {numel(shapes):,} params {name}: {r.get('step_s', r.get('error'))} s, "
                      f"extra {_mib(r.get('extra_bytes'))} MiB", flush=True)
            step_rows.append({"target": n, "numel": numel(shapes), "shapes": shapes, "methods": methods})
    machine["load_average_after"] = list(os.getloadavg())
    report = {"benchmark": "bench/cpu_speed.py", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python " + " ".join(["bench/cpu_speed.py", *(sys.argv[1:] if argv is None else argv)]),
              "args": vars(args), "machine": machine, "jax": jax_info, "meta": meta_rows, "steps": step_rows,
              "wall_s": time.perf_counter() - t_start}
    out = Path(args.out) if args.out else (tmp / "cpu_speed" if args.smoke else ROOT / "bench" / "results" / "cpu_speed")
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(report, indent=1) + "\n")
    Path(str(out) + ".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out}.json and {out}.md ({report['wall_s']:.0f} s)")
    errors = [r for row in meta_rows for r in (row["ouroboros"], row.get("jax") or {},
                                               *(row.get("ouroboros_procs") or {}).values()) if "error" in r]
    errors += [r for s in step_rows for r in s["methods"].values() if "error" in r or "memory_error" in r]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
