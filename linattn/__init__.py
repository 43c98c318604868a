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

Finally it turns on JAX's persistent compilation cache in $XDG_CACHE_HOME/linattn/jax (default
~/.cache/linattn/jax): a program compiled once on a machine (the same computation, shapes, compile
options, XLA flags and jax version: JAX's cache key) is loaded from disk by later processes instead
of compiled again. Keys, learning rates and starting parameters are traced, so reruns with other
seeds or rates load it too. LINATTN_COMPILATION_CACHE=off turns it off and a path moves it;
JAX_COMPILATION_CACHE_DIR, if set, is JAX's own setting and wins. Every program is kept however
short its compilation (JAX's default keeps those over 1 s): the reference benchmark's programs
(50 when this was measured, most of them small eager ones; 30 now) then loaded in 7.7 s against
8.1-8.5 s when only those over 0.02 s were kept (BENCHMARKS.md). XLA's CPU loader checks an entry
against the host CPU's features and compiles again where they differ (jax-ml/jax issue 38445), so a
home folder shared by different machines is safe. Results record the folder. The first compilation
of a process fixes the setting for it (JAX reads it once).
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


COMPILATION_CACHE_MIN_SECONDS = 0.0


def _cache_folder() -> str | None:
    """The persistent compilation cache folder linattn asks JAX for (None: off or JAX's own setting)."""
    if "JAX_COMPILATION_CACHE_DIR" in _os.environ:
        return None
    choice = _os.environ.get("LINATTN_COMPILATION_CACHE", "").strip()
    if choice.lower() in ("off", "0", "false", "no", "none"):
        return None
    if choice:
        return _os.path.expanduser(choice)
    base = _os.environ.get("XDG_CACHE_HOME") or _os.path.join(_os.path.expanduser("~"), ".cache")
    return _os.path.join(base, "linattn", "jax")


def _compilation_cache() -> None:
    import jax

    folder = _cache_folder()
    if folder is None:
        return
    try:
        _os.makedirs(folder, exist_ok=True)
    except OSError:  # e.g. a read-only home: compile as usual
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in _os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILATION_CACHE_MIN_SECONDS)


_one_device_per_core()
_sequential_threefry()
_cpu_loop_emitters()
_compilation_cache()
