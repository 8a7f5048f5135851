"""sparsek-remote: benchmark SparseK attention kernels on rented GPUs.

The public surface is re-exported here. Everything importable from this package
needs only the base install (pydantic, pyyaml), because the GPU-side runner reads
the same job spec and writes the same bundle schema. The host-only parts (SSH,
Docker, the command line) live in their own modules and need the ``host`` extra.
"""

from sparsek_remote.errors import (
    BundleError,
    ConfigError,
    GateFailed,
    ImageError,
    JobSpecError,
    RemoteError,
    RunnerError,
    SettingsError,
    SparsekRemoteError,
)
from sparsek_remote.jobspec import JobSpec, job_json_schema, load_job, parse_job
from sparsek_remote.schema import SCHEMA_VERSION, CaseResult, Manifest, Results

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "CaseResult",
    "ConfigError",
    "GateFailed",
    "ImageError",
    "JobSpec",
    "JobSpecError",
    "Manifest",
    "RemoteError",
    "Results",
    "RunnerError",
    "SCHEMA_VERSION",
    "SettingsError",
    "SparsekRemoteError",
    "__version__",
    "job_json_schema",
    "load_job",
    "parse_job",
]
