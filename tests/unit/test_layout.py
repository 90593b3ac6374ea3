"""The model repository's layout, names and version policy (serving/layout.py), and the flags that use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import ConfigError, ServeConfig
from serving.layout import (
    LayoutError,
    VersionPolicy,
    check_name,
    fingerprint,
    next_version,
    oip_name,
    scan,
    split_oip_name,
)


def test_a_graph_name_is_one_function_of_the_vae_and_the_graph_and_splits_back() -> None:
    for vae in ("digits", "fleet-a", "fleet.a", "x.encoder"):
        for graph in ("encoder", "decoder", "score"):
            assert split_oip_name(oip_name(vae, graph)) == (vae, graph)
    assert split_oip_name("encoder") == (None, "encoder")
    assert split_oip_name(".encoder") == (None, ".encoder")


@pytest.mark.parametrize("text, available, want", [
    ("latest:1", [1, 3, 2], [3]),
    ("latest:2", [1, 3, 2, 10], [3, 10]),
    ("latest:5", [2], [2]),
    ("all", [3, 1], [1, 3]),
    ("specific:1,3", [1, 2, 3], [1, 3]),
    ("specific:4", [1, 2, 3], []),
])
def test_the_version_policy_picks_as_triton_does(text: str, available: list[int], want: list[int]) -> None:
    assert VersionPolicy.parse(text).select(available) == want


@pytest.mark.parametrize("text", ["latest", "latest:0", "latest:x", "all:2", "specific:", "specific:01", "newest:1"])
def test_a_bad_version_policy_names_the_forms_it_takes(text: str) -> None:
    with pytest.raises(LayoutError, match=r"expected latest:N \(N >= 1\), all, or specific:V"):
        VersionPolicy.parse(text)


def test_scan_finds_models_and_integer_versions_and_skips_everything_else(tmp_path: Path) -> None:
    for d in ("a/1", "a/2", "a/10", "a/01", "a/0", "a/.3.staging-1-x", "a/v4", "b", ".hidden/1", "bad name/1"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "a" / "5").write_text("a file, not a version")
    (tmp_path / "README").write_text("not a model")
    found = scan(tmp_path)
    assert {n: sorted(v) for n, v in found.items()} == {"a": [1, 2, 10], "b": []}
    assert next_version(tmp_path / "a") == 11 and next_version(tmp_path / "new") == 1


def test_a_missing_repository_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="model-repository: cannot read"):
        scan(tmp_path / "nope")


def test_a_fingerprint_changes_when_a_file_of_the_version_changes(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text("{}")
    before = fingerprint(tmp_path)
    (tmp_path / "encoder.onnx").write_bytes(b"x")
    assert fingerprint(tmp_path) != before and fingerprint(tmp_path / "gone") == ()


def test_model_names_are_checked_naming_the_field() -> None:
    assert check_name("fleet-a.v2_x") == "fleet-a.v2_x"
    with pytest.raises(LayoutError, match="--name: expected a model name matching"):
        check_name("../etc", "--name")


@pytest.mark.parametrize("kw, message", [
    ({"model_control": "poll"}, "model-control: expected none without --model-repository"),
    ({"model_control": "sometimes", "model_repository": Path("r")}, "model-control: expected one of"),
    ({"model_control": "explicit", "model_repository": Path("r"), "workers": 2},
     "model-control: expected poll or none with --workers other than 1"),
    ({"load_model": "m", "model_repository": Path("r")}, "load-model: expected empty unless --model-control explicit"),
    ({"version_policy": "latest:0"}, "version-policy: expected latest:N"),
    ({"repository_poll_s": 0.0}, "repository-poll-s: expected a number > 0"),
])
def test_repository_settings_are_validated_naming_the_flag(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**kw)  # type: ignore[arg-type]


def test_poll_mode_works_with_several_workers_and_the_flags_parse_from_the_environment() -> None:
    c = ServeConfig.from_args([], env={"VAE_SERVE_MODEL_REPOSITORY": "/models", "VAE_SERVE_MODEL_CONTROL": "poll",
                                       "VAE_SERVE_WORKERS": "2", "VAE_SERVE_VERSION_POLICY": "all"})
    assert (c.model_repository, c.model_control, c.workers, c.version_policy) == (Path("/models"), "poll", 2, "all")
