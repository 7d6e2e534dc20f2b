"""One exception family for problems with user input, so the CLI can print one line and exit 2."""


class EdgefaError(Exception):
    """Bad input a user can fix (a corrupt bundle, a wrong shape, NaN data). Never a bug."""


class BundleError(EdgefaError):
    """A bundle that is missing a file, fails a hash, has an unknown version or mismatched shapes."""


class DataError(EdgefaError):
    """A data file that cannot be read, or holds NaN/Inf, wrong shapes or invalid labels."""


class CheckpointError(EdgefaError):
    """A checkpoint that is unreadable or incomplete (for example, missing its feedback matrices)."""


class DiagnosisError(EdgefaError):
    """A measurement the diagnostic protocol refuses: fp16, a run it cannot judge, a mismatched baseline."""
