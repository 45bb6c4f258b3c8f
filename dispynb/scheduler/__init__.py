"""Client-side scheduling: which job runs on which node, and which results count.

`SchedulerState` is a pure state machine (events in, instructions out, no I/O);
`dispynb.scheduler.policy` holds its decisions (pipeline depth, load balancing).
"""

from __future__ import annotations

from dispynb.scheduler.events import (
    AbandonJob,
    AcceptResult,
    CancelQueued,
    CancelRequested,
    CancelRunning,
    DropQueued,
    Event,
    Instruction,
    JobFinished,
    JobReturned,
    JobSubmitted,
    NodeJoined,
    NodeLeft,
    ResubmitJob,
    SendJobs,
)
from dispynb.scheduler.state import NodeInfo, SchedulerState

__all__ = [
    "AbandonJob",
    "AcceptResult",
    "CancelQueued",
    "CancelRequested",
    "CancelRunning",
    "DropQueued",
    "Event",
    "Instruction",
    "JobFinished",
    "JobReturned",
    "JobSubmitted",
    "NodeInfo",
    "NodeJoined",
    "NodeLeft",
    "ResubmitJob",
    "SchedulerState",
    "SendJobs",
]
