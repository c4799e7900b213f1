"""What a team's own workflows need from the worker that serves them: the activities their
code calls. A worker that lacks one takes the workflow and then retries the activity's task
forever ("not registered on this worker"); `check_activities` refuses it at start instead.

The check reads the workflow class's source: an activity named by a string, or by a function
the workflow's module can reach, is found; one whose name is computed at run time is not.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from keel.config import SettingsError

# the workflow calls that schedule an activity, by the name its first argument gives
ACTIVITY_CALLS = {
    f"{verb}_{kind}{form}"
    for verb in ("execute", "start")
    for kind in ("activity", "local_activity")
    for form in ("", "_method", "_class")
}


def workflow_name(cls: type) -> str:
    """The workflow type a @workflow.defn class registers."""
    defn = getattr(cls, "__temporal_workflow_definition", None)
    return str(getattr(defn, "name", None) or cls.__name__)


def activity_name(fn: Any) -> str | None:
    """The activity type an @activity.defn callable registers (None: a dynamic one)."""
    defn = getattr(fn, "__temporal_activity_definition", None)
    return getattr(defn, "name", None)


def called_activities(cls: type) -> dict[str, str]:
    """The activities the class's own code calls on its worker's task queue, by a name its
    source gives plainly: activity type -> `module:attribute` of the function ("" when the
    source names it by a string)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}  # no source to read (built at run time, or a compiled module)
    module = sys.modules.get(cls.__module__)
    scope: Mapping[str, Any] = vars(module) if module else {}
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or _callee(node.func) not in ACTIVITY_CALLS:
            continue
        if any(k.arg == "task_queue" for k in node.keywords):
            continue  # another queue's workers serve it
        target = node.args[0] if node.args else None
        target = target or next((k.value for k in node.keywords if k.arg == "activity"), None)
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            found.setdefault(target.value, "")
            continue
        fn = _resolve(target, scope)
        name = activity_name(fn)
        if name:
            found[name] = f"{fn.__module__}:{fn.__qualname__}"
    return found


def check_activities(workflows: Iterable[type], served: Sequence[Any]) -> None:
    """Refuse workflows whose code calls activities none of `served` is, naming each and
    where it is defined, where the code says."""
    have = {activity_name(f) for f in served}
    for cls in workflows:
        missing = [
            f"{name!r} ({where})" if where else repr(name)
            for name, where in sorted(called_activities(cls).items())
            if name not in have
        ]
        if missing:
            raise SettingsError(
                f"workflow {workflow_name(cls)} calls activity {', '.join(missing)}, which "
                "this worker does not serve: name it with --activities module:attribute (one "
                "activity or a list; or KEEL_ACTIVITIES)"
            )


def _callee(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def _resolve(node: ast.expr | None, scope: Mapping[str, Any]) -> Any:
    """The object a dotted name (`fn`, `module.fn`, `Class.method`) stands for in the
    module's globals; None for anything else (`self.method`, a call, a variable)."""
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, scope)
        return getattr(base, node.attr, None) if base is not None else None
    return None
