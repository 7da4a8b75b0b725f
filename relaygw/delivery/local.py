"""Local delivery: the Maildir courier, run in the spool's thread pool."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, gatherResults, succeed

from relaygw.delivery.courier import DeliveryJob
from relaygw.delivery.maildir import deliver_to_maildir
from relaygw.results import transient


class MaildirCourier:
    def __init__(self, run: Callable[..., Deferred], hostname_source: Callable[[], str]) -> None:
        self.run = run  # blocking work goes to a thread pool
        self.hostname_source = hostname_source

    def deliver(self, job: DeliveryJob) -> Deferred:
        hostname = self.hostname_source()
        calls = []
        for decision in job.decisions:
            if decision.maildir is None:  # routing turns these into rejects; never guess
                calls.append(succeed(transient("4.3.5", "no safe mailbox path")))
                continue
            calls.append(self.run(deliver_to_maildir, decision.maildir, decision.recipient,
                                  job.envelope.sender, job.content, job.queue_id, hostname))
        return gatherResults(calls, consumeErrors=True).addErrback(
            lambda f: [transient("4.3.0", f"maildir delivery failed: {f.getErrorMessage()}")]
            * len(job.decisions))
