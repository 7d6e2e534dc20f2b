"""The meters: named windows of latency, memory and energy (profiler.py), process memory
(memory.py), energy sensors (sensors.py, tegrastats.py) and the profiler for this machine
(machine.py). numpy only; the runtime and the device server time every phase with them.
`edgefa profile` itself, which runs the runtime under them, is profile_runs/."""
