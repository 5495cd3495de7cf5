"""Failing a machine with a reason, before anything on it is touched."""

from typing import Any, TypeVar

from pyinfra import host, state
from pyinfra.api import operation

from flakefleet import sudo
from flakefleet.run import Run, fail
from flakefleet.target import RemoteFact

T = TypeVar("T")


@operation(is_idempotent=False)
def refuse(reason: str):
    """Fail the machine with `reason`; its later steps are skipped.

    Example:

    .. code:: python

        refuse.refuse(name="Goal boot", reason="darwin machines cannot 'boot'")
    """
    yield fail(reason)


def read_as_root(step: str, fact: type[RemoteFact[T]], **arguments: Any) -> T | None:
    """Read a fact as root (``Target.read_as_root``, which asks for a sudo password as a
    deploy does), or fail the machine at `step` with sudo's reason and return None.

    Example: ``standing = read_as_root("Status", StatusSnapshot, profile=target.profile)``
    """
    target = Run.of(state).target(host.name)
    try:
        found = target.read_as_root(host, fact, **arguments)
    except sudo.SudoError as error:
        refuse(name=step, reason=str(error))
        return None
    refusal = getattr(found, "sudo_refusal", None)
    if refusal:
        refuse(name=step, reason=f"sudo refused to read the {step.lower()}: {refusal}")
        return None
    return found
