"""The SSH side: connections with a strict host-key policy, quoted remote commands,
streamed transfers, detached jobs with a heartbeat and one lock per host, and the
virtualenv of bare hosts. paramiko's exceptions become ``RemoteError`` in
``connection`` and nowhere else. Only the workflow imports this package."""

from sparsek_remote.remote.bare import BareEnv, install, installed_tag, wheels_tag
from sparsek_remote.remote.commands import quote_argv, sh_argv
from sparsek_remote.remote.connection import (
    CommandResult,
    Connection,
    ConnectOptions,
    disk_full_hint,
)
from sparsek_remote.remote.hostkeys import (
    KNOWN_HOSTS_NAME,
    HostKeyCheck,
    check_host_key,
    fingerprint,
    forget_host_key,
)
from sparsek_remote.remote.jobs import (
    BUNDLE_FOLDER,
    JOB_NAME,
    JobStatus,
    LockState,
    RemoteJob,
    RunnerCommand,
    cancel,
    clear_stale_lock,
    follow,
    launch,
    lock_state,
    log_tail,
    remote_job,
    status,
)
from sparsek_remote.remote.runstate import HostRecord, RunBook, RunRecord, list_run_ids
from sparsek_remote.remote.transfer import (
    download_tar,
    upload_bytes,
    upload_files,
)

__all__ = [
    "BUNDLE_FOLDER",
    "BareEnv",
    "CommandResult",
    "ConnectOptions",
    "Connection",
    "HostKeyCheck",
    "HostRecord",
    "JOB_NAME",
    "JobStatus",
    "KNOWN_HOSTS_NAME",
    "LockState",
    "RemoteJob",
    "RunBook",
    "RunRecord",
    "RunnerCommand",
    "cancel",
    "check_host_key",
    "clear_stale_lock",
    "disk_full_hint",
    "download_tar",
    "fingerprint",
    "follow",
    "forget_host_key",
    "install",
    "installed_tag",
    "launch",
    "list_run_ids",
    "lock_state",
    "log_tail",
    "quote_argv",
    "remote_job",
    "sh_argv",
    "status",
    "upload_bytes",
    "upload_files",
    "wheels_tag",
]
