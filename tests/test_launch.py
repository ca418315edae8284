"""The pods' launcher: torchrun's shutdown timeout comes from the pod's grace period."""

import pytest

from difftrain.launch import _agent_arguments, shutdown_timeout


@pytest.mark.parametrize(("grace", "expected"), [(300, 285), (30, 27), (3600, 3585), (10, 8)])
def test_shutdown_timeout_leaves_a_margin_within_the_grace_period(grace, expected):
    assert shutdown_timeout(grace) == expected


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        pytest.param(
            [],
            {"DIFFTRAIN_GRACE_SECONDS": "300"},
            ["--shutdown-timeout=285"],
            id="from-the-grace-period",
        ),
        pytest.param([], {}, ["--shutdown-timeout=30"], id="torchruns-default-without-one"),
        pytest.param(
            ["--shutdown-timeout=99"],
            {"DIFFTRAIN_GRACE_SECONDS": "300"},
            ["--shutdown-timeout=99"],
            id="a-flag-wins",
        ),
        pytest.param(
            [],
            {"PET_SHUTDOWN_TIMEOUT": "50", "DIFFTRAIN_GRACE_SECONDS": "300"},
            [],
            id="torchruns-variable-wins",
        ),
    ],
)
def test_agent_arguments(argv, env, expected):
    assert _agent_arguments(argv, env) == [*expected, "--module", "difftrain.trainer"]
