import itertools
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_prune.schedules import (
    SCHEDULES,
    CubicSchedule,
    ExponentialSchedule,
    IterativeSchedule,
    LinearSchedule,
    OneShotSchedule,
    SparsitySchedule,
    build_schedule,
)

GRADUAL = [LinearSchedule, CubicSchedule, ExponentialSchedule]
sparsities = st.floats(min_value=0.0, max_value=0.999, allow_nan=False)


@st.composite
def gradual_schedules(draw) -> SparsitySchedule:
    cls = draw(st.sampled_from(GRADUAL))
    s_i, s_f = sorted([draw(sparsities), draw(sparsities)])
    start = draw(st.integers(0, 20))
    end = start + draw(st.integers(0, 30))
    every = draw(st.integers(1, 5))
    return cls(final_sparsity=s_f, start_epoch=start, end_epoch=end, every_n_epochs=every, initial_sparsity=s_i)


@given(gradual_schedules())
def test_gradual_schedules_are_monotone_with_exact_endpoints(schedule):
    values = [schedule.sparsity_at(e) for e in range(schedule.end_epoch + 10)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert all(0.0 <= v < 1.0 for v in values)
    assert schedule.sparsity_at(schedule.end_epoch) == schedule.final_sparsity
    assert schedule.sparsity_at(schedule.end_epoch + 100) == schedule.final_sparsity
    if schedule.end_epoch > schedule.start_epoch:
        assert schedule.sparsity_at(schedule.start_epoch) == schedule.initial_sparsity
    if schedule.start_epoch > 0:
        assert schedule.sparsity_at(schedule.start_epoch - 1) == 0.0


@given(gradual_schedules())
def test_target_changes_only_on_pruning_epochs(schedule):
    epochs = set(schedule.pruning_epochs())
    assert schedule.start_epoch in epochs and schedule.end_epoch in epochs
    for e in range(schedule.start_epoch + 1, schedule.end_epoch + 5):
        if e not in epochs:
            assert schedule.sparsity_at(e) == schedule.sparsity_at(e - 1)


@given(st.lists(sparsities, min_size=1, max_size=8).map(sorted), st.integers(0, 5), st.integers(1, 4))
def test_iterative_follows_its_list(values, start, every):
    s = IterativeSchedule(sparsities=values, start_epoch=start, every_n_epochs=every)
    assert s.final_sparsity == values[-1]
    for i, v in enumerate(values):
        assert s.sparsity_at(start + i * every) == v
    if start:
        assert s.sparsity_at(start - 1) == 0.0
    for i, v in enumerate(values[:-1]):  # between two steps the previous target holds
        assert s.sparsity_at(start + i * every + every - 1) == v
    assert s.pruning_epochs() == [start + i * every for i in range(len(values))]


def test_cubic_matches_zhu_and_gupta():
    s_i, s_f, t0, n, dt = 0.1, 0.9, 2, 4, 2
    s = CubicSchedule(
        final_sparsity=s_f, initial_sparsity=s_i, start_epoch=t0, end_epoch=t0 + n * dt, every_n_epochs=dt
    )
    for t in range(t0, t0 + n * dt + 1, dt):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert s.sparsity_at(t) == pytest.approx(expected, abs=1e-12)


def test_linear_and_exponential_values():
    lin = LinearSchedule(final_sparsity=0.8, start_epoch=0, end_epoch=4)
    assert [round(lin.sparsity_at(e), 10) for e in range(5)] == [0.0, 0.2, 0.4, 0.6, 0.8]
    exp = ExponentialSchedule(final_sparsity=0.936, start_epoch=0, end_epoch=3)
    kept = [1 - exp.sparsity_at(e) for e in range(4)]
    assert kept[1] / kept[0] == pytest.approx(kept[2] / kept[1]) == pytest.approx(kept[3] / kept[2])
    assert math.isclose(kept[3], 0.064)


def test_one_shot_prunes_once():
    s = OneShotSchedule(final_sparsity=0.7, start_epoch=3)
    assert [s.sparsity_at(e) for e in range(6)] == [0.0, 0.0, 0.0, 0.7, 0.7, 0.7]
    assert s.pruning_epochs() == [3]


def test_open_end_is_resolved_by_with_end_epoch():
    s = LinearSchedule(final_sparsity=0.5, start_epoch=1)
    with pytest.raises(ValueError, match="end_epoch"):
        s.sparsity_at(2)
    resolved = s.with_end_epoch(5)
    assert resolved.end_epoch == 5 and resolved.sparsity_at(5) == 0.5
    assert resolved.with_end_epoch(9) is resolved


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_build_by_name_reaches_the_final_sparsity(name):
    end = 2 if name == "one_shot" else 6
    s = build_schedule(name, sparsity=0.75, start_epoch=2, end_epoch=end, every_n_epochs=2)
    # Each schedule's own formula at epochs 0..7 (start 2, end 6, every 2): the gradual ones start from 0 at
    # `start_epoch`, iterative keeps the same fraction of the remaining weights at each of its 3 steps.
    kept_per_step = 0.25 ** (1 / 3)
    expected = {
        "one_shot": [0, 0, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75],
        "linear": [0, 0, 0, 0, 0.375, 0.375, 0.75, 0.75],
        "cubic": [0, 0, 0, 0, 0.75 * (1 - 0.5**3), 0.75 * (1 - 0.5**3), 0.75, 0.75],
        "exponential": [0, 0, 0, 0, 1 - 0.25**0.5, 1 - 0.25**0.5, 0.75, 0.75],
        "iterative": [0, 0, *[1 - kept_per_step] * 2, *[1 - kept_per_step**2] * 2, 0.75, 0.75],
    }[name]
    assert [s.sparsity_at(e) for e in range(8)] == pytest.approx(expected, abs=1e-12)
    assert s.pruning_epochs() == ([2] if name == "one_shot" else [2, 4, 6])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"final_sparsity": 1.0}, r"`final_sparsity` must be a number in \[0, 1\), got 1.0"),
        ({"final_sparsity": -0.1}, "final_sparsity"),
        ({"final_sparsity": "0.5"}, "final_sparsity"),
        ({"start_epoch": 5, "end_epoch": 2}, r"`end_epoch` \(2\) must not be before `start_epoch` \(5\)"),
        ({"every_n_epochs": 0}, "`every_n_epochs` must be an integer >= 1, got 0"),
        ({"start_epoch": -1}, "start_epoch"),
        ({"start_epoch": 1.5}, "start_epoch"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CubicSchedule(**kwargs)


def test_bad_iterative_and_names():
    with pytest.raises(ValueError, match="non-decreasing"):
        IterativeSchedule(sparsities=(0.5, 0.4))
    with pytest.raises(ValueError, match="at least one"):
        IterativeSchedule(sparsities=())
    with pytest.raises(ValueError, match="strictly increasing"):
        IterativeSchedule(sparsities=(0.1, 0.2), epochs=(3, 3))
    with pytest.raises(ValueError, match="same length"):
        IterativeSchedule(sparsities=(0.1, 0.2), epochs=(3,))
    with pytest.raises(ValueError, match=r"sparsities\[1\]"):
        IterativeSchedule(sparsities=(0.1, 1.2))
    with pytest.raises(ValueError, match="Unknown schedule 'cubik'"):
        build_schedule("cubik", sparsity=0.5)
    with pytest.raises(ValueError, match="one-shot"):
        OneShotSchedule(final_sparsity=0.5, start_epoch=1, end_epoch=4)
    with pytest.raises(TypeError, match="epoch"):
        LinearSchedule(end_epoch=3).sparsity_at(1.5)


def _readme_schedule_table() -> dict[str, list[str]]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("**When pruning starts.**", 1)[1].split("\n\n")[1]  # the table after the paragraph
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip("`"): cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def test_the_readme_table_of_when_pruning_starts_is_what_the_schedules_compute():
    table = _readme_schedule_table()
    assert list(table) == list(SCHEDULES)
    for name, cells in table.items():
        schedule = build_schedule(name, sparsity=0.8, start_epoch=2, end_epoch=2 if name == "one_shot" else 6)
        assert cells == [*(f"{schedule.sparsity_at(e):.3f}" for e in range(1, 7)), str(schedule.first_nonzero_epoch())]
    # The gradual schedules prune nothing at start_epoch: their first zeros come one step later.
    assert {name: cells[-1] for name, cells in table.items()} == {
        "one_shot": "2",
        "linear": "3",
        "cubic": "3",
        "exponential": "3",
        "iterative": "2",
    }


@pytest.mark.parametrize(
    ("schedule", "line"),
    [
        (
            CubicSchedule(final_sparsity=0.8, start_epoch=2, end_epoch=6, every_n_epochs=2),
            "cubic to 0.8 over epochs 2-6 (every 2); first non-zero target 0.7000 at epoch 4",
        ),
        (
            OneShotSchedule(final_sparsity=0.5, start_epoch=3),
            "one_shot to 0.5 at epoch 3; first non-zero target 0.5000 at epoch 3",
        ),
        (
            IterativeSchedule(sparsities=(0.0, 0.5, 0.9), start_epoch=1, every_n_epochs=2),
            "iterative to 0.9 at epochs 1, 3, 5; first non-zero target 0.5000 at epoch 3",
        ),
        (
            LinearSchedule(final_sparsity=0.0, start_epoch=0, end_epoch=4),
            "linear to 0 over epochs 0-4 (every 1); every target is 0: nothing is pruned",
        ),
    ],
)
def test_describe_says_when_the_first_non_zero_target_comes(schedule, line):
    assert schedule.describe() == line
