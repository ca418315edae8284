"""Status from observations: a table of what the operator sees and what it concludes."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from difftrain.api.validation import load_job
from difftrain.operator.status import (
    events,
    missing_pods,
    next_status,
    observe,
    set_condition,
    summary_reason,
    ttl_expired,
)
from tests.builders import job

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
EARLIER = "2026-11-26T11:00:00Z"


def batch_job(*conditions: tuple[str, str], suspend=False, queue=None) -> dict:
    labels = {"kueue.x-k8s.io/queue-name": queue} if queue else {}
    return {
        "metadata": {"labels": labels},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [{"type": t, "status": "True", "reason": r} for t, r in conditions]
        },
    }


def pod(
    phase="Running",
    exit_code=None,
    reason=None,
    message=None,
    waiting=None,
    unschedulable=False,
    disrupted=False,
    age=timedelta(minutes=1),
) -> dict:
    container = {"name": "trainer", "image": "trainer:1", "state": {}}
    if exit_code is not None:
        terminated = {"exitCode": exit_code, "reason": reason or "Error"}
        if message is not None:
            terminated["message"] = message
        container["state"]["terminated"] = terminated
    if waiting:
        container["state"]["waiting"] = {"reason": waiting, "message": "not found"}
    conditions = []
    if unschedulable:
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        )
    if disrupted:  # evicted: the Job controller makes a new pod in its place
        conditions.append(
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
        )
    created = (NOW - age).isoformat().replace("+00:00", "Z")
    return {
        "metadata": {"creationTimestamp": created},
        "status": {"phase": phase, "containerStatuses": [container], "conditions": conditions},
    }


def trainer_says(reason: str, message: str) -> str:
    return json.dumps({"reason": reason, "message": message})


FAILED = ("Failed", "BackoffLimitExceeded")
CASES = [
    # id, batch job, pods, restarts so far, expected (phase, reason, action)
    ("no-job-yet", None, [], 0, ("Pending", "Creating", "none")),
    ("pods-starting", batch_job(), [pod("Pending")], 0, ("Pending", "PodsStarting", "none")),
    (
        "unschedulable",
        batch_job(),
        [pod("Pending", unschedulable=True)],
        0,
        ("Pending", "Unschedulable", "none"),
    ),
    (
        "image-pull-young",
        batch_job(),
        [pod("Pending", waiting="ErrImagePull")],
        0,
        ("Pending", "ErrImagePull", "none"),
    ),
    (
        "image-pull-past-grace",
        batch_job(),
        [pod("Pending", waiting="ImagePullBackOff", age=timedelta(minutes=10))],
        0,
        ("Failed", "ImagePullBackOff", "none"),
    ),
    (
        "missing-secret",
        batch_job(),
        [pod("Pending", waiting="CreateContainerConfigError")],
        0,
        ("Pending", "CreateContainerConfigError", "none"),
    ),
    (
        "missing-secret-past-grace",
        batch_job(),
        [pod("Pending", waiting="CreateContainerConfigError", age=timedelta(minutes=10))],
        0,
        ("Failed", "CreateContainerConfigError", "none"),
    ),
    ("running", batch_job(), [pod(), pod()], 0, ("Running", "Training", "none")),
    (
        "disrupted-pod-replaced",
        batch_job(),
        [pod("Failed", 143, disrupted=True), pod()],
        0,
        ("Running", "Training", "none"),
    ),
    (
        "partly-running",
        batch_job(),
        [pod(), pod("Pending")],
        0,
        ("Pending", "PodsStarting", "none"),
    ),
    (
        "succeeded",
        batch_job(("Complete", "Completed")),
        [pod("Succeeded")],
        0,
        ("Succeeded", "Completed", "none"),
    ),
    (
        "dataset-error",
        batch_job(("Failed", "PodFailurePolicy")),
        [pod("Failed", 3, message=trainer_says("DatasetError", "the dataset has no images"))],
        0,
        ("Failed", "DatasetError", "none"),
    ),
    (
        "dataset-error-behind-exit-1",
        batch_job(FAILED),
        [pod("Failed", 1, message=trainer_says("DatasetError", "no images"))],
        0,
        ("Failed", "DatasetError", "none"),
    ),
    (
        "invalid-spec-without-message",
        batch_job(("Failed", "PodFailurePolicy")),
        [pod("Failed", 2)],
        0,
        ("Failed", "InvalidSpec", "none"),
    ),
    (
        "storage-denied",
        batch_job(("FailureTarget", "PodFailurePolicy")),
        [pod("Failed", 4, message=trainer_says("StorageAccessDenied", "list s3://b/: denied"))],
        0,
        ("Failed", "StorageAccessDenied", "none"),
    ),
    (
        "oom-restarts",
        batch_job(FAILED),
        [pod("Failed", 137, reason="OOMKilled")],
        0,
        ("Restarting", "OOMKilled", "restart"),
    ),
    (
        "crash-restarts",
        batch_job(FAILED),
        [pod("Failed", 1, message="Traceback ...")],
        2,
        ("Restarting", "Error", "restart"),
    ),
    (
        "crash-after-max-restarts",
        batch_job(FAILED),
        [pod("Failed", 137)],
        3,
        ("Failed", "MaxRestartsExceeded", "none"),
    ),
    # A preemption: one pod disrupted, the other checkpointed on SIGTERM (143). It is not
    # a failure: a job with no restarts left goes on.
    (
        "preempted",
        batch_job(FAILED),
        [pod("Failed", 143, disrupted=True), pod("Failed", 143)],
        3,
        ("Restarting", "Preempted", "preempted"),
    ),
    (
        "preempted-with-a-replacement-pod",
        batch_job(FAILED),
        [pod("Failed", 143, disrupted=True), pod("Failed", 143), pod("Pending")],
        3,
        ("Restarting", "Preempted", "preempted"),
    ),
    (
        "disrupted-but-a-peer-crashed",
        batch_job(FAILED),
        [pod("Failed", 143, disrupted=True), pod("Failed", 1)],
        0,
        ("Restarting", "Error", "restart"),
    ),
    (
        "disrupted-but-a-peer-failed-for-good",
        batch_job(FAILED),
        [pod("Failed", 143, disrupted=True), pod("Failed", 3)],
        0,
        ("Failed", "DatasetError", "none"),
    ),
    (
        "exit-143-without-a-disruption",
        batch_job(FAILED),
        [pod("Failed", 143)],
        3,
        ("Failed", "MaxRestartsExceeded", "none"),
    ),
    (
        "deadline",
        batch_job(("Failed", "DeadlineExceeded")),
        [pod("Failed", 143)],
        0,
        ("Failed", "DeadlineExceeded", "none"),
    ),
    ("suspended", batch_job(suspend=True), [], 0, ("Suspended", "Suspended", "none")),
    (
        "queued-in-kueue",
        batch_job(suspend=True, queue="team-a"),
        [],
        0,
        ("Pending", "WaitingForAdmission", "none"),
    ),
]


@pytest.mark.parametrize(
    ("batch", "pods", "restarts", "expected"),
    [pytest.param(b, p, r, e, id=name) for name, b, p, r, e in CASES],
)
def test_phase_reason_and_action(batch, pods, restarts, expected):
    spec = load_job(job({"metadata": {"generation": 1}}))

    status, action = next_status(spec, {"restarts": restarts}, observe(batch, pods, NOW), NOW)

    assert (status["phase"], _reason(status), action) == expected


def _reason(status: dict) -> str:
    """The reason of the most telling condition: a True one, else Running's, else Created's."""
    by_type = {c["type"]: c for c in status["conditions"]}
    for kind in ("Failed", "Succeeded", "Restarting", "Suspended", "Running"):
        if by_type.get(kind, {}).get("status") == "True":
            return by_type[kind]["reason"]
    return by_type.get("Running", by_type["Created"])["reason"]


def test_messages_carry_the_trainers_words():
    seen = observe(
        batch_job(("Failed", "PodFailurePolicy")),
        [pod("Failed", 3, message=trainer_says("DatasetError", "no images in s3://b/"))],
        NOW,
    )
    status, _ = next_status(load_job(job()), {}, seen, NOW)

    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["reason"], failed["message"]) == ("DatasetError", "no images in s3://b/")


def test_max_restarts_message_names_the_last_failure():
    seen = observe(batch_job(FAILED), [pod("Failed", 1, message="boom")], NOW)

    status, _ = next_status(load_job(job()), {"restarts": 3}, seen, NOW)

    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["message"] == "gave up after 3 restarts; last failure: Error: exit code 1: boom"


def test_whole_status_of_a_running_job():
    spec = load_job(job({"metadata": {"generation": 4}}))

    status, _ = next_status(
        spec, {"attempt": 1, "restarts": 0}, observe(batch_job(), [pod()], NOW), NOW
    )

    stamp = "2026-11-26T12:00:00Z"
    assert status == {
        "attempt": 1,
        "restarts": 0,
        "phase": "Running",
        "observedGeneration": 4,
        "startTime": stamp,
        "conditions": [
            {
                "type": "Created",
                "status": "True",
                "reason": "JobCreated",
                "message": "the attempt's Job exists",
                "lastTransitionTime": stamp,
                "observedGeneration": 4,
            },
            {
                "type": "Running",
                "status": "True",
                "reason": "Training",
                "message": "1 pods running",
                "lastTransitionTime": stamp,
                "observedGeneration": 4,
            },
        ],
    }


def test_transition_time_changes_only_with_status():
    first = set_condition([], "Running", True, "A", "a", NOW, 1)
    later = NOW + timedelta(minutes=5)

    same = set_condition(first, "Running", True, "B", "b", later, 2)
    flipped = set_condition(same, "Running", False, "C", "c", later, 2)

    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert same[0]["reason"] == "B"
    assert flipped[0]["lastTransitionTime"] == "2026-11-26T12:05:00Z"


def test_conditions_that_stop_being_true_are_cleared():
    spec = load_job(job())
    running, _ = next_status(spec, {}, observe(batch_job(), [pod()], NOW), NOW)

    done, _ = next_status(
        spec,
        running,
        observe(batch_job(("Complete", "Completed")), [], NOW),
        NOW + timedelta(hours=1),
    )

    by_type = {c["type"]: c["status"] for c in done["conditions"]}
    assert by_type == {"Created": "True", "Running": "False", "Succeeded": "True"}
    assert done["startTime"] == "2026-11-26T12:00:00Z"
    assert done["completionTime"] == "2026-11-26T13:00:00Z"


@pytest.mark.parametrize(
    ("ttl", "phase", "finished", "expired"),
    [
        (None, "Succeeded", EARLIER, False),
        (3600, "Succeeded", EARLIER, True),
        (3601, "Failed", EARLIER, False),
        (0, "Running", EARLIER, False),
    ],
)
def test_ttl_after_finished(ttl, phase, finished, expired):
    spec = load_job(
        job(spec={"runPolicy": {"ttlSecondsAfterFinished": ttl}} if ttl is not None else {})
    )

    assert ttl_expired(spec, {"phase": phase, "completionTime": finished}, NOW) is expired


def test_unschedulable_is_a_condition_not_a_failure():
    spec = load_job(job())
    waiting, action = next_status(
        spec, {}, observe(batch_job(), [pod("Pending", unschedulable=True)], NOW), NOW
    )

    scheduled, _ = next_status(spec, waiting, observe(batch_job(), [pod()], NOW), NOW)

    assert action == "none"
    unschedulable = next(c for c in waiting["conditions"] if c["type"] == "Unschedulable")
    assert (unschedulable["status"], unschedulable["message"]) == (
        "True",
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    )
    assert {c["type"]: c["status"] for c in scheduled["conditions"]}["Unschedulable"] == "False"


def test_restarting_lasts_until_the_new_attempt_runs_and_keeps_its_cause():
    spec = load_job(job())
    failed = observe(batch_job(FAILED), [pod("Failed", 137, reason="OOMKilled")], NOW)
    restarting, action = next_status(spec, {"attempt": 1, "restarts": 0}, failed, NOW)
    restarting = {**restarting, "attempt": 2, "restarts": 1}  # what the controller records

    starting, _ = next_status(spec, restarting, observe(batch_job(), [pod("Pending")], NOW), NOW)
    running, _ = next_status(spec, starting, observe(batch_job(), [pod()], NOW), NOW)

    assert action == "restart"
    assert starting["phase"] == "Restarting"
    cause = next(c for c in starting["conditions"] if c["type"] == "Restarting")
    assert (cause["status"], cause["reason"]) == ("True", "OOMKilled")
    assert running["phase"] == "Running"
    assert {c["type"]: c["status"] for c in running["conditions"]}["Restarting"] == "False"


def test_an_event_for_each_condition_that_becomes_true():
    spec = load_job(job())
    # The first reconcile can find the pods already running when it creates the Job.
    running, _ = next_status(spec, {}, observe(batch_job(), [pod()], NOW), NOW)
    again, _ = next_status(spec, running, observe(batch_job(), [pod()], NOW), NOW)
    done, _ = next_status(
        spec, running, observe(batch_job(("Complete", "Completed")), [], NOW), NOW
    )

    assert events({}, running) == [
        ("Normal", "JobCreated", "the attempt's Job exists"),
        ("Normal", "Training", "1 pods running"),
    ]
    assert events(running, again) == []
    assert [reason for _, reason, _ in events(running, done)] == ["Completed"]


def test_warnings_for_unschedulable_and_for_every_restart():
    spec = load_job(job())
    waiting, _ = next_status(
        spec, {}, observe(batch_job(), [pod("Pending", unschedulable=True)], NOW), NOW
    )
    failed = observe(batch_job(FAILED), [pod("Failed", 137, reason="OOMKilled")], NOW)
    first, _ = next_status(spec, {"attempt": 1, "restarts": 0}, failed, NOW)
    first = {**first, "attempt": 2, "restarts": 1}  # what the controller records
    second, _ = next_status(spec, first, failed, NOW)
    second = {**second, "attempt": 3, "restarts": 2}

    assert ("Warning", "Unschedulable") in [e[:2] for e in events({}, waiting)]
    assert [e[:2] for e in events(waiting, first)] == [("Warning", "OOMKilled")]
    # Restarting was already True: the second restart is an Event all the same.
    assert [e[:2] for e in events(first, second)] == [("Warning", "OOMKilled")]
    assert events(second, second) == []


def test_a_shorter_grace_fails_a_missing_secret_sooner():
    waiting = [pod("Pending", waiting="CreateContainerConfigError", age=timedelta(seconds=20))]

    default = observe(batch_job(), waiting, NOW)
    short = observe(batch_job(), waiting, NOW, grace=timedelta(seconds=10))

    assert (default.state, default.permanent) == ("pending", False)
    assert (short.state, short.permanent, short.message) == (
        "failed",
        True,
        "not found (for over 10 s)",
    )


def test_a_preemption_is_counted_apart_and_says_which_pod():
    spec = load_job(job(spec={"runPolicy": {"maxRestarts": 0}}))
    disrupted = pod("Failed", 143, disrupted=True)
    disrupted["metadata"]["name"] = "demo-a1-0-x7k2p"
    seen = observe(batch_job(FAILED), [disrupted, pod("Failed", 143)], NOW)

    status, action = next_status(spec, {"attempt": 1, "restarts": 0, "preemptions": 2}, seen, NOW)

    assert action == "preempted"
    restarting = next(c for c in status["conditions"] if c["type"] == "Restarting")
    assert restarting["message"] == (
        "restart after preemption 3 (not counted in maxRestarts): pod demo-a1-0-x7k2p was "
        "disrupted (EvictionByEvictionAPI)"
    )
    recorded = {**status, "attempt": 2, "preemptions": 3}  # what the controller records
    assert [e[:2] for e in events(status | {"preemptions": 2}, recorded)] == [
        ("Warning", "Preempted")
    ]


def test_the_last_attempt_number_ends_the_job():
    seen = observe(batch_job(FAILED), [pod("Failed", 143, disrupted=True)], NOW)

    status, action = next_status(load_job(job()), {"attempt": 999, "preemptions": 998}, seen, NOW)

    assert (status["phase"], action) == ("Failed", "none")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TooManyAttempts"


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([("Created", "True", "JobCreated"), ("Running", "True", "Training")], "Training"),
        (
            [("Created", "True", "JobCreated"), ("Running", "False", "CreateContainerConfigError")],
            "CreateContainerConfigError",
        ),
        ([("Created", "False", "CreateRefused")], "CreateRefused"),
        ([("Created", "False", "Creating")], "Creating"),
        (
            [
                ("Created", "True", "JobCreated"),
                ("Running", "False", "Training"),
                ("Failed", "True", "MaxRestartsExceeded"),
            ],
            "MaxRestartsExceeded",
        ),
        (
            [("Created", "True", "JobCreated"), ("Suspended", "True", "WaitingForAdmission")],
            "WaitingForAdmission",
        ),
    ],
)
def test_the_summary_reason_is_the_telling_conditions(conditions, expected):
    status = {"conditions": [{"type": t, "status": v, "reason": r} for t, v, r in conditions]}

    assert summary_reason(status) == expected


def test_an_event_when_the_cluster_refuses_or_a_secret_is_missing():
    refused = {
        "conditions": [
            {
                "type": "Created",
                "status": "False",
                "reason": "CreateRefused",
                "message": "forbidden",
            }
        ]
    }
    spec = load_job(job())
    waiting, _ = next_status(
        spec,
        {},
        observe(batch_job(), [pod("Pending", waiting="CreateContainerConfigError")], NOW),
        NOW,
    )

    assert events({}, refused) == [("Warning", "CreateRefused", "forbidden")]
    assert events(refused, refused) == []
    assert ("Warning", "CreateContainerConfigError", "not found") in events({}, waiting)
    assert events(waiting, waiting) == []


def test_pods_the_api_server_refuses_are_the_waiting_reason():
    refused = 'pods "demo-a1-0-" is forbidden: serviceaccount "robot" not found'
    two = {**batch_job(), "spec": {"suspend": False, "parallelism": 2}}

    seen = observe(two, [pod("Running")], NOW, refused=refused)
    status, action = next_status(load_job(job()), {}, seen, NOW)

    assert missing_pods(two, [pod("Running")]) and not missing_pods(two, [pod(), pod()])
    assert not missing_pods(batch_job(suspend=True), [])
    assert not missing_pods(batch_job(("Complete", "Completed")), [])
    assert (status["phase"], summary_reason(status), action) == ("Pending", "FailedCreate", "none")
    assert ("Warning", "FailedCreate", refused) in events({}, status)
