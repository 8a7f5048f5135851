"""A bug in one host's work becomes that host's error, never the whole command's."""

from __future__ import annotations

import importlib

import pytest

from sparsek_remote.errors import RemoteError, SparsekRemoteError, host_internal_error

# The package re-exports the deploy function under the module's name.
deploy = importlib.import_module("sparsek_remote.workflow.deploy")


def test_an_unexpected_exception_names_the_host_and_carries_its_trace() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        error = host_internal_error("gpu-a", exc)
    assert isinstance(error, SparsekRemoteError)
    assert "host 'gpu-a': internal error: KeyError" in error.message
    assert "please report it" in error.hint and "{}[\"missing\"]" in error.hint


@pytest.mark.parametrize("raised", [KeyError("slot"), RemoteError("host 'b' is unreachable")])
def test_deploy_keeps_each_hosts_failure_as_its_own(monkeypatch, raised) -> None:
    events: list[dict] = []

    def prepare(shared, alias, found):
        found["kind"] = "bare"
        if alias == "b":
            raise raised

    monkeypatch.setattr(deploy, "_prepare_host", prepare)
    shared = deploy._Shared(settings=None, image=None, options=None, codec="gzip",
                            wheels=None, on_event=events.append)
    ok, bad = deploy._deploy_host(shared, "a"), deploy._deploy_host(shared, "b")
    assert ok.ok and not bad.ok and bad.kind == "bare"
    if isinstance(raised, SparsekRemoteError):
        assert bad.error is raised
    else:
        assert "internal error: KeyError" in bad.error.message
    assert [e["state"] for e in events] == ["ready", "failed"]
