"""Task ids and the APIXO status shape clients and webhooks see."""

from __future__ import annotations

import secrets
import time
from typing import Any

from gateway.store import TaskRecord


def new_task_id() -> str:
    """gw_ + the creation time in ms (12 hex digits) + 48 random bits.

    Time first, so that ids sort by creation and every new task lands at the
    right-hand end of the tasks primary-key index (and of the ledger's): with
    fully random ids each insert dirtied a different leaf page of an index
    that outgrows the page cache, one more page read and one more page written
    to the WAL per submit. The random half keeps ids unguessable; the time is
    already the task's createTime.
    """
    return f"gw_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def now_ms() -> int:
    return int(time.time() * 1000)


def task_data(task: TaskRecord, shown_state: str | None = None) -> dict[str, Any]:
    """The `data` of an APIXO statusTask answer; never reveals the upstream id."""
    data: dict[str, Any] = {
        "taskId": task.id,
        "state": shown_state or ("pending" if task.state == "submitting" else task.state),
        "createTime": task.create_ms,
    }
    if task.state == "success":
        data["resultJson"] = task.result_json
    if task.state == "failed":
        data["failCode"] = task.fail_code
        data["failMsg"] = task.fail_msg
    if task.complete_ms is not None:
        data["completeTime"] = task.complete_ms
        data["costTime"] = task.complete_ms - task.create_ms
    return data


def status_envelope(task: TaskRecord, shown_state: str | None = None) -> dict[str, Any]:
    return {"code": 200, "message": "success", "data": task_data(task, shown_state)}
