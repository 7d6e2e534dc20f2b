"""`python -m edgefa.without_torch ARGS...` runs the edgefa CLI with torch made unimportable.

The device side must never need torch; running it this way proves it (any `import torch` raises
ImportError). `edgefa demo` runs its device process like this, and so do the tests.
"""

import sys


def main() -> None:
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
    from edgefa.cli import main as cli_main

    cli_main(prog_name="edgefa")


if __name__ == "__main__":
    main()
