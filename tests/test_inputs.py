"""Odd study files: names that would escape the storage folder, grids too large to run, and
validation that costs one config per axis value rather than one per grid cell."""
from __future__ import annotations

import textwrap

import pytest

import study.spaces as spaces
from study.spaces import MAX_TRIALS, SpaceError, load_study


def write(tmp_path, text: str):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", [".", "..", "-x", "_x", ".hidden", "a/b", "a b", "x" * 101])
def test_names_that_are_not_plain_words_are_refused(tmp_path, name):
    with pytest.raises(SpaceError, match="must start with a letter or digit"):
        load_study(write(tmp_path, f"name: '{name}'\n"))


@pytest.mark.parametrize("name", ["fig3_1", "3x", "a.b-c_d", "X" * 100])
def test_plain_names_are_accepted(tmp_path, name):
    assert load_study(write(tmp_path, f"name: '{name}'\n")).name == name


def test_a_grid_over_the_cap_is_refused_in_one_line(tmp_path):
    axis = list(range(1000))
    path = write(tmp_path, f"name: big\ngrid: {{seed: {axis}, data_seed: {axis}}}\n")
    with pytest.raises(SpaceError) as err:
        load_study(path)
    message = str(err.value)
    assert "1,000,000 cells" in message and f"{MAX_TRIALS:,}" in message and "s.yaml" in message
    assert "\n" not in message


def test_validation_builds_one_config_per_axis_value(tmp_path, monkeypatch):
    """10 × 10 × 10 independent axes: 1 + 9 + 9 + 9 configs, not 1000; a coupled pair of
    axes (dataset × num_classes) in every combination."""
    built = []
    original = spaces.TrialConfig.from_dict
    monkeypatch.setattr(spaces.TrialConfig, "from_dict", staticmethod(lambda d: built.append(d) or original(d)))
    ten = list(range(10))
    study = load_study(write(tmp_path, f"name: g\ngrid: {{seed: {ten}, data_seed: {ten}, epochs: {[e + 1 for e in ten]}}}\n"))
    assert study.n_trials == 1000 and len(built) == 28
    built.clear()
    load_study(write(tmp_path, "name: g\ngrid: {dataset: [teacher, conic], num_classes: [2, 4, 8], seed: [0, 1, 2]}\n"))
    assert len(built) == 6 + 2


def test_a_bad_value_on_one_axis_is_still_found_and_named(tmp_path):
    with pytest.raises(SpaceError, match=r"lr=-1.*lr must be a positive number"):
        load_study(write(tmp_path, "name: g\ngrid: {seed: [0, 1, 2], lr: [0.1, 0.2, -1]}\n"))


def test_a_bad_combination_of_coupled_fields_is_found(tmp_path):
    """dataset=npz needs data_path: only the combination fails, so combinations are checked."""
    with pytest.raises(SpaceError, match="dataset=npz needs data_path"):
        load_study(write(tmp_path, "name: g\ngrid: {dataset: [teacher, npz], seed: [0, 1]}\n"))


def test_max_failures_must_be_a_count(tmp_path):
    assert load_study(write(tmp_path, "name: g\n")).max_failures == 2
    assert load_study(write(tmp_path, "name: g\nmax_failures: 0\n")).max_failures == 0
    with pytest.raises(SpaceError, match="max_failures must be a whole number >= 0"):
        load_study(write(tmp_path, "name: g\nmax_failures: -1\n"))
