"""Job files: the shipped ones load, and malformed or hostile ones are refused with the
file, line and field named, through the real command line, leaving results/ untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsek_remote.cli import app
from sparsek_remote.errors import JobSpecError
from sparsek_remote.jobspec import job_json_schema, load_job
from tests.conftest import tree_snapshot

GOOD = """\
name: good
cases:
  - name: c1
    B: 1
    Hq: 4
    Hkv: 2
    S: 32
    D: 16
    dtype: float32
    causal: true
    kv_budget: 4
    window: 2
implementations:
  - kind: sparsek
    impl: reference
  - kind: sdpa
    backend: math
ncu:
  cases: [c1]
  implementations: [sdpa-math]
"""

SHELL_STRINGS = ["x; rm -rf /", "$(touch pwned)", "`id`", "a|b", "a&&b", "a>b", "a'b",
                 'a"b', "a b", "a\\nb", "../etc"]


def test_shipped_jobs_load(project_root: Path) -> None:
    smoke = load_job(project_root / "jobs/local_smoke.yaml")
    h100 = load_job(project_root / "jobs/h100_gpt4.yaml")
    assert smoke.cases and h100.cases
    names = {c.name for c in h100.cases}
    assert {"seed", "gpt4-4k", "long-64k", "seed-h8", "seed-h32", "seed-h96",
            "seed-h128"} <= names


def test_the_readme_example_job_is_a_valid_job(project_root: Path, tmp_path: Path) -> None:
    readme = (project_root / "README.md").read_text(encoding="utf-8")
    example = "name: local-smoke" + readme.split("```yaml\nname: local-smoke", 1)[1].split(
        "```", 1)[0]
    (tmp_path / "example.yaml").write_text(example)
    job = load_job(tmp_path / "example.yaml")
    assert job.timing.warmup_seconds is None and job.timing.min_seconds is None
    assert job.timing.for_device("cuda").min_seconds == 1.0


def test_good_job_parses(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    job = load_job(path)
    assert [i.label for i in job.implementations] == ["sparsek-reference", "sdpa-math"]
    assert job.targets == []


def _mutate(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


HOSTILE = {
    "unknown key": (_mutate("    window: 2\n", "    window: 2\n    windw: 3\n"),
                    ["line 13", "cases[0].windw", "unknown key"]),
    "wrong type": (_mutate("    S: 32", "    S: thirty-two"), ["line 7", "cases[0].S",
                                                               "integer"]),
    "float for int": (_mutate("    D: 16", "    D: 16.5"), ["cases[0].D"]),
    "string for bool": (_mutate("causal: true", 'causal: "yes"'), ["cases[0].causal",
                                                                   "boolean"]),
    "negative budget": (_mutate("kv_budget: 4", "kv_budget: -1"), ["line 11",
                                                                   "cases[0].kv_budget",
                                                                   "greater than or equal"]),
    "negative window": (_mutate("window: 2", "window: -5"), ["cases[0].window"]),
    "heads do not divide": (_mutate("Hkv: 2", "Hkv: 3"), ["cases[0]", "multiple of Hkv"]),
    "unknown backend": (_mutate("backend: math", "backend: fastest"),
                        ["implementations[1].backend"]),
    "unknown implementation kind": (_mutate("kind: sdpa", "kind: flexattention"),
                                    ["implementations[1]"]),
    "duplicate case": (GOOD.replace(
        "implementations:",
        "  - {name: c1, B: 1, Hq: 1, Hkv: 1, S: 8, D: 16, kv_budget: 1, window: 1}\n"
        "implementations:", 1), ["appears twice"]),
    "duplicate key": (_mutate("    B: 1\n", "    B: 1\n    B: 2\n"), ["line 5", "'B'",
                                                                       "appears twice"]),
    "ncu names unknown case": (_mutate("cases: [c1]", "cases: [c9]"), ["ncu", "c9"]),
    "least sampling beyond the budget": (
        _mutate("cases:", "timing: {max_seconds: 2, min_seconds: 5}\ncases:"),
        ["timing", "min_seconds (5) exceeds max_seconds (2)", "raise max_seconds"]),
    "not yaml": ("name: [unclosed\n", ["not valid YAML"]),
    "empty file": ("", ["empty"]),
    "top level list": ("- 1\n- 2\n", ["top level must be a mapping"]),
    "missing cases": ("name: x\nimplementations: [{kind: sdpa, backend: math}]\n",
                      ["cases", "required"]),
}

for i, text in enumerate(SHELL_STRINGS):
    HOSTILE[f"shell in job name {i}"] = (_mutate("name: good", f"name: {text!r}"),
                                         ["name", "only letters"])
HOSTILE["shell in case name"] = (_mutate("  - name: c1", "  - name: 'c1;reboot'"),
                                 ["cases[0].name", "only letters"])
HOSTILE["shell in implementation name"] = (
    _mutate("    impl: reference", "    impl: reference\n    name: '$(id)'"),
    ["implementations[0].name", "only letters"])
HOSTILE["shell in target"] = (_mutate("cases:", "targets: ['h100;id']\ncases:"),
                              ["targets[0]", "host alias"])
HOSTILE["shell in dtype"] = (_mutate("dtype: float32", "dtype: 'float32;id'"),
                             ["cases[0].dtype"])
HOSTILE["shell in device"] = (_mutate("cases:", "device: 'cuda`id`'\ncases:"), ["device"])
HOSTILE["shell in impl"] = (_mutate("impl: reference", "impl: 'triton|sh'"),
                            ["implementations[0].impl"])
HOSTILE["shell in ncu case"] = (_mutate("cases: [c1]", "cases: ['c1&&id']"), ["ncu.cases[0]"])
HOSTILE["shell in ncu section"] = (_mutate("ncu:\n", "ncu:\n  sections: ['SpeedOfLight;id']\n"),
                                   ["ncu.sections[0]"])
HOSTILE["shell in clock control"] = (_mutate("ncu:\n", "ncu:\n  clock_control: '$(id)'\n"),
                                     ["ncu.clock_control"])


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_job_is_refused_by_the_cli(name: str, workdir: Path) -> None:
    text, expected = HOSTILE[name]
    job = workdir / "job.yaml"
    job.write_text(text)
    (workdir / "results" / "earlier-run").mkdir()
    (workdir / "results" / "earlier-run" / "keep.json").write_text("{}")
    before = tree_snapshot(workdir / "results")

    result = CliRunner().invoke(app, ["run", str(job)])

    assert result.exit_code == 2, result.output
    message = result.output
    assert str(job) in message
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert tree_snapshot(workdir / "results") == before
    assert not (workdir / ".sparsek" / "work").exists() or not any(
        (workdir / ".sparsek" / "work").iterdir())


def test_errors_do_not_echo_values(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(_mutate("name: good", "name: 'secret-looking value; rm'"))
    with pytest.raises(JobSpecError) as info:
        load_job(path)
    assert "secret-looking" not in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="cannot read the file"):
        load_job(tmp_path / "nope.yaml")


def test_schema_names_every_top_level_field() -> None:
    props = job_json_schema()["properties"]
    assert {"name", "targets", "device", "cases", "implementations", "timing", "correctness",
            "ncu", "timeouts"} <= set(props)


def test_schema_command_prints_json() -> None:
    import json

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "JobSpec"
