"""`edgefa profile` and `edgefa profile compare`: fine-tuning runs under the profiler, and the
documents they write (profile.json, compare.json).

    session.py   fine-tune a scratch copy of a bundle here, or drive a device over the link, for N
                 steps under the profiler; the budget beside the measurement
    compare.py   the DFA side and the BP side each in a process of its own, and the ratios

These sit above both the meters (profiling/) and the runtime (runtime/), which itself runs every
phase in a profiler window: that is why they are not in profiling/. numpy + onnxruntime only: a
device profiles itself. The BP side, which needs torch, is host code: training/bp_profile.py.
"""
