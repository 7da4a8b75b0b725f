# A pointer only: Twisted imports this on every plugin scan, so it must have no side effects.
from twisted.application.service import ServiceMaker

relaygw = ServiceMaker(
    "relaygw",
    "relaygw.daemon.tap",
    "SMTP relay and forwarding gateway",
    "relaygw",
)
