"""linattn: a JAX simulator of in-context learning and fine-tuning in linear attention.

See ../README.md for the layout; SPEC sections are cited in each module's docstring.

On a CPU host, importing linattn before JAX starts asks for one JAX device per core
(jax_num_cpu_devices), so that the training engine (linattn.train) can use every core without
flags. Set JAX_NUM_CPU_DEVICES (or XLA_FLAGS=--xla_force_host_platform_device_count=N) to choose.

It also sets jax_threefry_partitionable to False (unless JAX_THREEFRY_PARTITIONABLE is set): the
partitionable Threefry, JAX's default since 0.5, hashes twice the bits so that jit can split one
random array over devices, which linattn never asks for (every device draws its own prompts from
its own folded key). Normals then cost about 0.6x and the statistics sampler 0.75x on CPU
(BENCHMARKS.md). The random streams are JAX's pre-0.5 ones; results record the setting.

And it turns off XLA's CPU fusion emitters (XLA_FLAGS gains --xla_cpu_use_fusion_emitters=false,
unless XLA_FLAGS already names that flag): with the older loop emitters the evaluation, theory and
short training programs compile in less CPU time and run as fast or faster. The training engine
compiles its long programs with the fusion emitters again, which run those faster
(linattn.train.compiler_options; BENCHMARKS.md, "2026-12-07, fourth session"). The flag is read
by the CPU compiler only, when the backend starts; results record XLA_FLAGS.
"""

import os as _os

__version__ = "0.2.0"


def _one_device_per_core() -> None:
    if "JAX_NUM_CPU_DEVICES" in _os.environ or "device_count" in _os.environ.get("XLA_FLAGS", ""):
        return
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", _os.cpu_count() or 1)
    except RuntimeError:  # JAX already started its backends: keep what it has
        pass


def _sequential_threefry() -> None:
    if "JAX_THREEFRY_PARTITIONABLE" in _os.environ:
        return
    import jax

    jax.config.update("jax_threefry_partitionable", False)


def _backends_started() -> bool:
    try:  # JAX has no public query; without it, assume not started
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:
        return False
    return backends_are_initialized()


def _cpu_loop_emitters() -> None:
    flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_fusion_emitters" not in flags and not _backends_started():  # else XLA has read XLA_FLAGS
        _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_use_fusion_emitters=false").strip()


_one_device_per_core()
_sequential_threefry()
_cpu_loop_emitters()
