"""`python -m edgefa.cli ARGS` (and `torchrun ... -m edgefa.cli train ...`): the `edgefa` command."""

from . import main

if __name__ == "__main__":        # (importing this module, as a walk of the package does, runs nothing)
    main()
