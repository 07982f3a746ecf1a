"""One exception tree for the transport; pika's errors are converted to these at the boundary."""


class BrokerError(Exception):
    """Base of every transport failure."""


class ConnectionLost(BrokerError):
    """The connection to the broker is gone; the caller may reconnect and retry."""


class PublishRefused(BrokerError):
    """The broker did not take a message: it was unroutable (no queue bound) or nacked."""


class DeliveryGone(BrokerError):
    """An ack or dead-letter for a delivery whose channel has closed; the broker will redeliver it."""
