"""Device profiles as data: what a board can compute, move and draw, with a source for each figure.

Each supported device is one TOML file in `data/` (one per profile name), every figure carrying its
source in a comment: a data sheet, a developer guide, "derived: a x b", or "assumed: ...".

    load_profile("jetson-orin-nano-8gb")    a known name, or a path to a .toml of the same schema
    detect_profile()                         (profile, one-line reason it was chosen)

    profile.py      DeviceProfile, the frozen record every other module passes around
    loading.py      the TOML files: read and check every field
    detection.py    which board this is: the device-tree model (the longest match wins, so
                    "Orin Nano" never becomes "AGX Orin"), else a guess from the L4T release in
                    /etc/nv_tegra_release, else on an x86-64 host generic-x86.toml filled in with
                    the CPU, memory and runtime figures it can read or measure (saying which in
                    `detected`)
    host_probe.py   the measurement: copy bandwidth and the runtime's memory, in a probe process
    budget.py       what fine-tuning a bundle will cost on a profile, before it runs

Device side: standard library and numpy only.
"""

from .detection import DETECTED_SOURCE, GENERIC, detect_profile
from .loading import list_profiles, load_profile
from .profile import AUTO_PROVIDERS, KINDS, SENSOR_BACKENDS, DeviceProfile, ProfileError

__all__ = ["AUTO_PROVIDERS", "DETECTED_SOURCE", "GENERIC", "KINDS", "SENSOR_BACKENDS", "DeviceProfile",
           "ProfileError", "detect_profile", "list_profiles", "load_profile"]
