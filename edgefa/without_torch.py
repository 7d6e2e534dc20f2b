"""`python -m edgefa.without_torch ARGS...` runs the edgefa CLI with torch made unimportable.

The device side must never need torch; running it this way proves it (any `import torch` raises
ImportError). `edgefa demo` runs its device process like this, and so do the tests.
"""

import sys


class _NoTorch:
    """A meta-path finder that makes `import torch` fail as it does where torch is not installed.
    (Not `sys.modules["torch"] = None`: other libraries, scipy among them, take a "torch" key in
    sys.modules to mean that torch is loaded, and look inside it.)"""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def block_torch() -> None:
    """From here on, in this process, `import torch` raises ModuleNotFoundError."""
    sys.meta_path.insert(0, _NoTorch())


def main() -> None:
    block_torch()
    from edgefa.cli import main as cli_main

    cli_main(prog_name="edgefa")


if __name__ == "__main__":
    main()
