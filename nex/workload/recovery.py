"""What a node started again after a crash does with the workloads its last run left.

Two traces of them outlive a node killed outright: its machines' directories on the same state
directory, whose ``workload.json`` says which workloads were running (see
:class:`~nex.vm.machine.RunningWorkload`), and its records in the KV bucket (:mod:`.records`), which
hold the deploy requests. :func:`leftovers` joins the two by workload id, and the workload manager
settles each leftover once the node can deploy:

- an essential workload that was running, or whose essential restart was due, is deployed again
  from its record: the deploy request as it was received, through every check of a deploy (its
  sealed environment is opened with the node's own xkey, which the state directory keeps);
- every workload that was running gets its ``workload_stopped`` (a watcher of its id would wait
  for ever otherwise), whose message says what became of it;
- a record of a workload that was not running when the node died is one whose removal failed (the
  bucket was unreachable when the workload ended): it is removed, never acted on, so that a workload
  stopped on purpose does not come back. A record alone is not enough to run something again;
  the machine's directory on this host must agree.

A node that cannot read the bucket when it starts (no JetStream there, or none answering in time)
reports its last run's workloads stopped and deploys none of them again; their records are removed
once the bucket answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from nex.vm.machine import RunningWorkload

from .records import WorkloadRecord

CRASHED = "its node stopped unexpectedly"


@dataclass(frozen=True)
class Leftover:
    """A workload of the node's last run: what ran (``ran``) and what was recorded (``record``)."""

    workload_id: str
    name: str
    namespace: str
    ran: bool  # its machine's directory says it was running when the node died
    record: WorkloadRecord | None

    @property
    def redeploy(self) -> bool:
        """To be deployed again: essential, and running or due for an essential restart."""
        record = self.record
        return record is not None and record.essential and (self.ran or record.restart_pending)


def leftovers(ran: list[RunningWorkload], records: list[WorkloadRecord]) -> list[Leftover]:
    """The last run's workloads, from what ran (machine directories) and what was recorded (the bucket)."""
    by_id = {record.workload_id: record for record in records}
    found = [Leftover(w.vmid, w.name, w.namespace, True, by_id.pop(w.vmid, None)) for w in ran]
    found += [Leftover(r.workload_id, r.name, r.namespace, False, r) for r in by_id.values()]
    return found


def redeployed(workload_id: str) -> str:
    """``workload_stopped``'s message for a workload that runs again under a new id."""
    return f"{CRASHED}; deployed again as {workload_id}"


def not_redeployed(why: str) -> str:
    return f"{CRASHED}; could not deploy it again: {why}"
