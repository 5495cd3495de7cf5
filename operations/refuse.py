"""Failing a machine with a reason, before anything on it is touched."""

from pyinfra.api import operation

from flakefleet.run import fail


@operation(is_idempotent=False)
def refuse(reason: str):
    """Fail the machine with `reason`; its later steps are skipped.

    Example:

    .. code:: python

        refuse.refuse(name="Goal boot", reason="darwin machines cannot 'boot'")
    """
    yield fail(reason)
