"""The flows the command line drives, one module each, composing the layers below:
``local`` (a job on this machine), ``remote_run`` (a job on hosts: run, resume,
fetch, cancel, trust), ``deploy`` (build the image, ship it, probe every host).
Only the command line imports this package."""

from sparsek_remote.workflow.deploy import (
    CODECS,
    BuildOptions,
    DeployOutcome,
    HostDeployment,
    ShipResult,
    build,
    deploy,
)
from sparsek_remote.workflow.deployments import Deployment, docker_runner, load_deployment
from sparsek_remote.workflow.local import (
    RunOutcome,
    git_state,
    make_report,
    resolve_targets,
    run_job,
)
from sparsek_remote.workflow.preflight import Gpu, Preflight
from sparsek_remote.workflow.remote_run import (
    DockerRunner,
    HostOutcome,
    RemoteOutcome,
    build_wheels,
    cancel_run,
    fetch_runs,
    resume_run,
    run_on_hosts,
    trust_hosts,
)

__all__ = ["DockerRunner", "HostOutcome", "RemoteOutcome", "RunOutcome", "build_wheels",
           "cancel_run", "fetch_runs", "git_state", "make_report", "resolve_targets",
           "resume_run", "run_job", "run_on_hosts", "trust_hosts"]
# deploy
__all__ += ["CODECS", "BuildOptions", "DeployOutcome", "Deployment", "Gpu", "HostDeployment",
            "Preflight", "ShipResult", "build", "deploy", "docker_runner", "load_deployment"]
